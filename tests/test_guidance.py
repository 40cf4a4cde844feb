"""Guidance on real images: nothing to say on images like the training data, concrete fixes otherwise."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_graphkd.guidance import assess, background_level, training_summary
from napari_graphkd.sizing import equivalent_diameters
from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample
from napari_graphkd.segment import AS_TRAINED, load_segmenter, segment_any

torch.set_num_threads(1)
BRIGHTFIELD = sorted((Path(__file__).parents[1] / "examples" / "data" / "brightfield").glob("*/images/*.tif"))


@pytest.fixture(scope="module")
def student():
    return load_segmenter("student")


def test_training_summary_names_data_image_type_and_diameter(student):
    text = training_summary(student.describe())
    assert text.startswith("trained on BBBC039 fluorescence") and "DSB2018 fluorescence" in text
    assert "DSB2018 bright-field" in text and "328 images" in text and "28 px" in text
    assert "/" not in text  # never a machine path
    tuned = {"mode": "finetune", "images": ["mine"], "diameter": 21.7, "base": {"name": "student"}}
    assert training_summary(dict(student.describe(), finetune=tuned)).endswith(
        "; then finetune of student on 1 image(s) of yours (nuclei 22 px, run at 28 px)")
    saved = {"train_diameter": 28.3, "finetune": tuned}  # what a fine-tuned checkpoint records
    assert training_summary(saved) == "finetune of student on 1 image(s) of yours (nuclei 22 px, run at 28 px)"
    assert training_summary({}) == "trained on unknown data, nuclei 28 px"


def test_equivalent_diameters_and_background_level():
    labels = np.zeros((40, 40), np.int32)
    labels[:10, :10] = 1
    labels[20:22, 20:22] = 3
    np.testing.assert_allclose(equivalent_diameters(labels, skip_border=False)[0], 2 * np.sqrt(np.array([100, 4]) / np.pi))
    dark = np.zeros((50, 50), np.uint8)
    dark[10:20, 10:20] = 200
    assert background_level(dark) < 0.1 and background_level(255 - dark) > 0.9


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_bundled_samples_need_no_advice(student, name):
    image = load_sample(name)[0]
    assert assess(segment_any(student, image), student.describe(), image) == []


@pytest.mark.skipif(not BRIGHTFIELD, reason="the bright-field example crops are not in this checkout")
@pytest.mark.parametrize("path", BRIGHTFIELD[:4], ids=lambda p: p.stem)
def test_brightfield_without_inversion_suggests_dark_nuclei(student, path):
    image = tifffile.imread(path)
    advice = " ".join(assess(segment_any(student, image, invert=False), student.describe(), image))
    assert "set the nuclei to 'dark on bright'" in advice and "fine-tune" in advice


def test_inverting_a_fluorescence_image_is_flagged(student):
    image = load_sample(SAMPLE_NAMES[0])[0][:200, :200]
    advice = assess(segment_any(student, image, invert=True), student.describe(), image)
    assert any("'bright on dark'" in line for line in advice)


def test_upscaled_sample_suggests_the_diameter(student):
    image = load_sample(SAMPLE_NAMES[1])[0][:260, :348]
    big = np.kron(image, np.ones((2, 2), image.dtype))  # nuclei twice the training size
    advice = assess(segment_any(student, big, **AS_TRAINED.kwargs()), student.describe(), big)
    assert len(advice) == 1 and "set the nucleus diameter to" in advice[0]
    suggested = float(advice[0].rsplit(" ", 1)[-1])
    assert 45 <= suggested <= 65  # about twice the training diameter (28 px)
    fixed = segment_any(student, big, **dict(AS_TRAINED.kwargs(), diameter=suggested))
    assert assess(fixed, student.describe(), big) == []
    assert assess(segment_any(student, big), student.describe(), big) == []  # the automatic diameter needs no advice


def test_training_summary_names_every_source_of_a_generalist():
    data = {"train_images": 322, "sources": [{"name": "bbbc039", "folder": "bbbc039/train"},
                                             {"name": "dsb2018_fluo", "folder": "dsb2018_fluo"}]}
    assert training_summary({"training_data": data, "train_diameter": 28.3}) == (
        "trained on BBBC039 fluorescence (bright nuclei, dark background) + DSB2018 fluorescence (several labs and "
        "magnifications), 322 images, nuclei 28 px")
