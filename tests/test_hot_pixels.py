"""A hot pixel (defective or saturated sensor element) never becomes a nucleus; real images keep their labels."""
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_graphkd.preprocess import normalize, suppress_hot_pixels
from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample
from napari_graphkd.segment import load_segmenter, segment_any

EMPTY = Path(__file__).parent / "data" / "bbbc039_L01_s2_nucleus_free_crop.tif"


@pytest.fixture(scope="module")
def models():
    return {name: load_segmenter(name) for name in ("student", "teacher")}


def with_hot_pixels(image: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``image`` with ``n`` saturated pixels at random places (corners and edges included)."""
    rng = np.random.default_rng(seed)
    out = image.copy()
    ys = np.r_[0, image.shape[0] - 1, rng.integers(0, image.shape[0], n)][:n]
    xs = np.r_[0, image.shape[1] - 1, rng.integers(0, image.shape[1], n)][:n]
    out[ys, xs] = np.iinfo(image.dtype).max
    return out


def count(segmenter, image) -> int:
    return len(np.unique(segment_any(segmenter, image).labels)) - 1


def fields():
    """uint16 fields without nuclei: zeros, sensor noise, the real nucleus-free crop."""
    rng = np.random.default_rng(1)
    noise = rng.normal(100, 8, (192, 256)).clip(0).astype(np.uint16)
    return {"zeros": np.zeros((192, 256), np.uint16), "noise": noise, "nucleus-free": tifffile.imread(EMPTY)}


@pytest.mark.parametrize("model", ["student", "teacher"])
@pytest.mark.parametrize("field", ["zeros", "noise", "nucleus-free"])
@pytest.mark.parametrize("hot", [1, 8])
def test_empty_fields_with_hot_pixels_have_no_objects(models, model, field, hot):
    assert count(models[model], with_hot_pixels(fields()[field], hot)) == 0


@pytest.mark.parametrize("model", ["student", "teacher"])
def test_the_nucleus_free_field_has_no_objects(models, model):
    assert count(models[model], fields()["nucleus-free"]) == 0


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_real_images_with_hot_pixels_keep_their_count(models, name):
    image, _ = load_sample(name)
    clean = count(models["student"], image)
    assert abs(count(models["student"], with_hot_pixels(image, 20, seed=2)) - clean) <= 1


def test_real_images_with_hot_pixels_keep_their_count_teacher(models):
    image = load_sample(SAMPLE_NAMES[0])[0][:256, :320]
    assert abs(count(models["teacher"], with_hot_pixels(image, 10)) - count(models["teacher"], image)) <= 1


def test_suppression_clamps_isolated_outliers_to_their_neighbours_only():
    image = np.zeros((6, 7), np.float32)
    image[2:5, 2:5] = [[1, 2, 1], [2, 3, 2], [1, 2, 1]]  # a blurred peak: kept
    image[0, 6] = 50.0  # a hot corner pixel
    image[5, 0] = 0.5  # a small outlier within the margin: kept
    out = image.copy()
    assert suppress_hot_pixels(out, above=0.0, margin=1.0) == 1
    assert out[0, 6] == 0.0 and np.array_equal(np.delete(out.ravel(), 6), np.delete(image.ravel(), 6))


def test_normalisation_of_a_real_image_moves_only_a_few_pixels(sample):
    off, on = normalize(sample[0], hot_pixel_margin=0), normalize(sample[0])
    assert np.count_nonzero(off != on) < 50 and np.abs(off - on).max() < 0.2
