"""Decoder clean-up: the lookup-table and fragment-pixel rules equal the scipy/skimage definitions on real labels."""
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels, relabel_sequential

from napari_graphkd.decode.mws import dilate_cross, drop_small, filter_3x3, merge_fragments, relabel


@pytest.fixture(scope="module")
def scattered(sample):
    """Real ground-truth labels with sparse ids (gaps, unsorted) and speckled small fragments, 2-px ties included."""
    labels = sample[1].astype(np.int64) * 7
    rng = np.random.default_rng(0)
    outline = ndi.maximum_filter(labels, size=3) != ndi.minimum_filter(labels, size=3)
    boundary = outline & (rng.random(labels.shape) < 0.05)
    labels[boundary] = labels.max() + 1 + rng.integers(0, 500, boundary.sum())  # 1-3 px fragments on outlines
    return labels


def test_relabel_equals_skimage_relabel_sequential(scattered):
    expected = relabel_sequential(scattered)[0]
    out = relabel(scattered)
    assert out.dtype == expected.dtype and np.array_equal(out, expected)


def test_drop_small_equals_zeroing_small_objects_then_relabelling(scattered):
    counts = np.bincount(scattered.ravel())
    expected = relabel_sequential(np.where((counts < 40)[scattered] & (scattered > 0), 0, scattered))[0]
    assert np.array_equal(drop_small(scattered, 40), expected)


@pytest.mark.parametrize("distance", [1, 2, 3])
def test_merge_fragments_equals_expand_labels_on_the_fragment_pixels(scattered, distance):
    """Each fragment pixel takes expand_labels' choice, ties between equidistant objects included."""
    counts = np.bincount(scattered.ravel())
    fragment = (counts < 10)[scattered] & (scattered > 0)
    kept = np.where(fragment, 0, scattered)
    expected = np.where(fragment, expand_labels(kept, distance), kept)
    assert np.array_equal(merge_fragments(scattered, 10, distance), expected)


def test_3x3_filter_equals_scipy_max_and_min_filters(scattered):
    odd = scattered[3:200, 5:161]
    assert np.array_equal(filter_3x3(odd, np.maximum), ndi.maximum_filter(odd, size=3))
    assert np.array_equal(filter_3x3(odd, np.minimum), ndi.minimum_filter(odd, size=3))


def test_cross_dilation_equals_scipy_binary_dilation(scattered):
    mask = scattered > 0
    for iterations in (1, 2, 3):
        assert np.array_equal(dilate_cross(mask, iterations), ndi.binary_dilation(mask, iterations=iterations))
