"""Classical Otsu + distance-watershed baseline, on a real crop of a bundled BBBC039 sample (``crop``).

It runs on images the input rules prepared (``prepare_image``), as the pipeline hands them over.
"""
from __future__ import annotations

import numpy as np
import pytest

from napari_graphkd.decode.classical import ClassicalSettings, segment_classical
from napari_graphkd.inference import prepare_image
from napari_graphkd.metrics import evaluate
from napari_graphkd.segment import AS_TRAINED, ClassicalSegmenter, segment_any


def classical(image: np.ndarray, invert: bool = False) -> np.ndarray:
    """Labels of a raw image, prepared as the pipeline prepares it."""
    return segment_classical(prepare_image(image, invert=invert))


def _discs(centres: list[tuple[int, int]], radius: int = 10, shape: tuple[int, int] = (64, 96)) -> np.ndarray:
    """Bright uint16 discs on a dark background."""
    rr, cc = np.indices(shape)
    inside = np.zeros(shape, dtype=bool)
    for r, c in centres:
        inside |= (rr - r) ** 2 + (cc - c) ** 2 <= radius**2
    return np.where(inside, 1000, 100).astype(np.uint16)


def test_finds_nuclei_on_real_crop(crop):
    image, gt = crop
    labels = classical(image)
    scores = evaluate(gt, labels)
    assert scores["f1@0.5"] > 0.7
    assert abs(scores["n_pred"] - scores["n_gt"]) <= 0.3 * scores["n_gt"]


def test_output_is_sequential_int32(crop):
    labels = classical(crop[0])
    assert labels.dtype == np.int32 and labels.shape == crop[0].shape
    np.testing.assert_array_equal(np.unique(labels), np.arange(labels.max() + 1))


def test_invert_segments_dark_objects(crop):
    image = crop[0]
    np.testing.assert_array_equal(classical(image.max() - image, invert=True), classical(image))


def test_touching_discs_are_split():
    labels = classical(_discs([(32, 30), (32, 48)]))
    assert labels.max() == 2


def test_separate_discs_and_small_debris():
    image = _discs([(20, 20), (40, 70)])
    image[55:58, 5:8] = 1000  # 9 px speck, below min_size
    assert classical(image).max() == 2


@pytest.mark.parametrize("value", [0, 7])
def test_constant_image_gives_no_objects(value):
    labels = classical(np.full((32, 40), value, dtype=np.uint16))
    assert labels.dtype == np.int32 and labels.shape == (32, 40) and not labels.any()


def test_rejects_non_2d():
    with pytest.raises(ValueError, match="2D"):
        segment_classical(np.zeros((2, 8, 8)))


def test_settings_scale_with_the_nucleus_diameter(crop):
    """Nuclei twice the reference size get twice the peak distance and four times the minimum size."""
    assert ClassicalSettings().scaled(2.0) == ClassicalSettings(1.0, 18, 120)
    plain = segment_any(ClassicalSegmenter(), crop[0], **AS_TRAINED.kwargs()).labels
    large = segment_any(ClassicalSegmenter(), crop[0], diameter=2 * ClassicalSegmenter.train_diameter).labels
    np.testing.assert_array_equal(plain, classical(crop[0]))
    assert 0 < large.max() < plain.max()
