"""Normalisation fast paths give numpy's numbers bit for bit on real images."""
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_graphkd.inference import prepare_image
from napari_graphkd.preprocess import median, normalize, percentile_range

EMPTY = Path(__file__).parent / "data" / "bbbc039_L01_s2_nucleus_free_crop.tif"


@pytest.mark.parametrize("percentiles", [(1.0, 99.8), (0.0, 100.0), (50.0, 50.5), (33.3, 66.6)])
def test_histogram_percentiles_equal_numpy_percentile(sample, percentiles):
    for image in (sample[0], sample[0][:101, :77], (sample[0] >> 4).astype(np.uint8), tifffile.imread(EMPTY)):
        assert image.dtype in (np.uint8, np.uint16)
        expected = np.percentile(image, percentiles)
        out = percentile_range(image, percentiles)
        assert out.dtype == expected.dtype and np.array_equal(out, expected)


def test_partition_median_equals_numpy_median(sample):
    diffs = np.diff(sample[0][::4].astype(np.float32), axis=1).ravel()
    for values in (diffs, diffs[:-1], diffs[:1], np.abs(diffs - 0.5), np.r_[diffs, np.nan]):
        expected = np.median(values)
        out = median(values)
        assert out.dtype == expected.dtype and np.array_equal(out, expected, equal_nan=True)


def test_8_and_16_bit_images_normalise_exactly_as_their_float32_copy(sample):
    """prepare_image hands 8/16-bit images to normalize unconverted (histogram percentiles); nothing changes."""
    for image in (sample[0], (sample[0] >> 4).astype(np.uint8), tifffile.imread(EMPTY)):
        expected = normalize(image.astype(np.float32))
        assert np.array_equal(prepare_image(image), expected) and np.array_equal(normalize(image), expected)
