"""Decoding volumes: the 3D ground-truth round trip (real and synthetic), strided long-range edges, 3D clean-up rules."""
from dataclasses import dataclass

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels

from conftest import relabel_equal
from napari_graphkd.affinity import label_affinities, offsets_for
from napari_graphkd.decode.mws import (
    DecodeSettings, decode, dilate_cross, fill_holes, filter_3x3, merge_fragments, mutex_watershed, remove_background,
)
from napari_graphkd.io.datasets import env_data_root

EXACT = DecodeSettings(min_size=1, merge_distance=0)  # no size rule: every ground-truth instance must come back
DATA_ROOT = env_data_root()
REAL_CROPS = {  # (z, y, x) crops of the 3D label volumes of the data folder
    "nuclei3d_lightsheet/labels/lightsheet.tif": np.s_[60:92, 40:104, 40:104],
    "em3d_gala/labels/train.tif": np.s_[10:26, 20:68, 40:104],
}


def connected_instances(labels: np.ndarray) -> np.ndarray:
    """Each face-connected piece of each id as its own instance (what any crop of a volume can give back)."""
    out = np.zeros(labels.shape, dtype=np.int64)
    for i in np.unique(labels)[1:]:
        pieces, n = ndi.label(labels == i)
        out[pieces > 0] = pieces[pieces > 0] + out.max()
    return out


def enclosed_background(labels: np.ndarray) -> np.ndarray:
    """Background voxels not connected to the volume's border (the decoder's fill-holes rule gives them to an object)."""
    return ndi.binary_fill_holes(labels > 0) & (labels == 0)


def assert_same_instances(decoded: np.ndarray, truth: np.ndarray) -> None:
    """Same partition of the truth's objects, background only where the truth's open background is."""
    holes = enclosed_background(truth)
    assert relabel_equal(np.where(holes, 0, decoded), truth)
    assert (decoded[holes] > 0).all()  # enclosed pockets are filled by a neighbouring object


@dataclass
class VolumeOutput:
    """What the decoding policy reads of a network output (a stride-1 network at the volume's size)."""

    embedding: np.ndarray
    foreground: np.ndarray
    image_shape: tuple[int, ...]
    stride: int = 1

    @property
    def full_shape(self) -> tuple[int, ...]:
        return self.image_shape

    def full_embedding(self) -> np.ndarray:
        return self.embedding

    def full_foreground(self) -> np.ndarray:
        return self.foreground


def touching_boxes(seed: int = 0) -> np.ndarray:
    """(12,20,24) volume of boxes that touch in z, y and x, two stacked in z sharing a whole face, one hollow."""
    labels = np.zeros((12, 20, 24), dtype=np.int64)
    labels[1:6, 2:9, 2:10] = 1
    labels[6:11, 2:9, 2:10] = 2  # directly on top of 1 in z
    labels[1:11, 9:17, 2:10] = 3  # touches 1 and 2 in y
    labels[2:10, 4:16, 10:21] = 4  # touches 1, 2 and 3 in x
    labels[4:7, 8:12, 13:17] = 0  # a pocket inside 4 (filled by the decoder)
    rng = np.random.default_rng(seed)
    labels[rng.random(labels.shape) < 0.002] = 0  # a few background specks, most enclosed
    return labels


@pytest.mark.parametrize("anisotropy", [1.0, 3.0])
@pytest.mark.parametrize("stride, randomized", [(1, False), (2, False), (4, False), (4, True)])
def test_synthetic_volume_round_trip(anisotropy, stride, randomized):
    truth = connected_instances(touching_boxes())
    offsets = offsets_for(3, anisotropy)
    target, _ = label_affinities(truth, offsets)
    settings = DecodeSettings(min_size=1, merge_distance=0, long_range_stride=stride, randomized_strides=randomized)
    decoded = decode(target, (truth > 0).astype(np.float32), settings, offsets)
    assert decoded.shape == truth.shape and decoded.dtype == np.int32
    assert_same_instances(decoded, truth)


def three_blobs(shape=(12, 24, 24)) -> np.ndarray:
    """Three balls (radius 4 voxels) apart from each other in a volume: the simplest 3D decoding case."""
    zz, yy, xx = np.indices(shape)
    labels = np.zeros(shape, dtype=np.int64)
    for i, (z, y, x) in enumerate([(6, 6, 6), (6, 12, 18), (6, 18, 6)], start=1):
        labels[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 16] = i
    return labels


@pytest.mark.parametrize("anisotropy", [1.0, 1.5, 2.0, 2.5, 4.0])
@pytest.mark.parametrize("stride", [1, 4])
def test_three_blobs_round_trip_at_every_anisotropy(anisotropy, stride):
    """z offsets of 1, 2 or 4 voxels (short or long range) with strided long-range edges: every object comes back,
    from label affinities and from a one-hot embedding (affinities on the stride grid only)."""
    from napari_graphkd.decode.policy import decode_output

    truth = three_blobs()
    offsets = offsets_for(3, anisotropy)
    settings = DecodeSettings(long_range_stride=stride)
    target, _ = label_affinities(truth, offsets)
    foreground = (truth > 0).astype(np.float32)
    assert relabel_equal(decode(target, foreground, settings, offsets), truth)
    assert relabel_equal(decode(target, None, settings, offsets), truth)
    embedding = np.eye(4, dtype=np.float32)[truth].transpose(3, 0, 1, 2)
    assert relabel_equal(decode_output(VolumeOutput(embedding, foreground, truth.shape), settings, offsets)[0], truth)


def test_z_affinities_alone_separate_objects_stacked_in_z():
    truth = np.zeros((8, 6, 6), dtype=np.int64)
    truth[1:4, 1:5, 1:5], truth[4:7, 1:5, 1:5] = 1, 2
    offsets = offsets_for(3)
    target, _ = label_affinities(truth, offsets)
    assert relabel_equal(decode(target, (truth > 0).astype(np.float32), EXACT, offsets), truth)
    target[0] = 1.0  # z affinities all say "same object": the two boxes merge
    assert len(np.unique(decode(target, (truth > 0).astype(np.float32), EXACT, offsets))) == 2


def test_volume_without_foreground_head_takes_the_border_segment_as_background():
    truth = connected_instances(touching_boxes())
    truth = connected_instances(fill_holes(truth))  # no pockets: the background is one border-connected segment
    offsets = offsets_for(3)
    target, _ = label_affinities(truth, offsets)
    assert relabel_equal(decode(target, None, EXACT, offsets), truth)
    segments = mutex_watershed(target, offsets, stride=2)
    assert relabel_equal(remove_background(segments, (truth > 0).astype(float)), truth)


@pytest.mark.parametrize("path", list(REAL_CROPS))
def test_real_3d_ground_truth_round_trip(path):
    if DATA_ROOT is None or not (DATA_ROOT / path).exists():
        pytest.skip(f"set GRAPHKD_DATA to the data folder holding {path} to run the real-volume round trip")
    truth = connected_instances(tifffile.imread(DATA_ROOT / path)[REAL_CROPS[path]].astype(np.int64))
    offsets = offsets_for(3)
    target, _ = label_affinities(truth, offsets)
    decoded = decode(target, (truth > 0).astype(np.float32), EXACT, offsets)
    assert len(np.unique(truth)) > 4  # several instances in the crop
    assert_same_instances(decoded, truth)


def test_3d_fragments_merge_as_expand_labels_does():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        labels = np.zeros((6, 7, 8), dtype=np.int64)
        for i in range(1, 8):
            z, y, x = rng.integers(0, 6), rng.integers(0, 7), rng.integers(0, 8)
            labels[z : z + rng.integers(1, 4), y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = i
        min_size, distance = int(rng.integers(2, 20)), int(rng.integers(1, 4))
        fragment = (np.bincount(labels.ravel()) < min_size)[labels] & (labels > 0)
        kept = np.where(fragment, 0, labels)
        expected = np.where(fragment, expand_labels(kept, distance), kept)
        np.testing.assert_array_equal(merge_fragments(labels, min_size, distance), expected)


def test_3d_neighbourhood_helpers_equal_scipy():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, (5, 6, 7))
    mask = rng.random((5, 6, 7)) > 0.7
    np.testing.assert_array_equal(filter_3x3(labels, np.maximum), ndi.maximum_filter(labels, size=3))
    np.testing.assert_array_equal(filter_3x3(labels, np.minimum), ndi.minimum_filter(labels, size=3))
    np.testing.assert_array_equal(dilate_cross(mask, 2), ndi.binary_dilation(mask, iterations=2))
    hollow = np.zeros((5, 5, 5), dtype=np.int64)
    hollow[1:4, 1:4, 1:4] = 7
    hollow[2, 2, 2] = 0
    assert (fill_holes(hollow)[1:4, 1:4, 1:4] == 7).all() and fill_holes(hollow)[0].max() == 0


@pytest.mark.parametrize("resolution", ["full", "half"])
def test_decoding_a_volume_network_output_on_the_full_and_a_coarser_grid(resolution):
    """decode_output with a volume: one-hot embeddings of touching boxes come back (half grid: up to outline voxels)."""
    from napari_graphkd.decode.policy import decode_output
    from napari_graphkd.metrics import evaluate

    truth = np.zeros((12, 24, 24), dtype=np.int64)
    truth[1:11, 2:12, 2:22], truth[1:11, 12:22, 2:12], truth[1:11, 12:22, 12:22] = 1, 2, 3
    embedding = np.eye(4, dtype=np.float32)[truth].transpose(3, 0, 1, 2)
    output = VolumeOutput(embedding, (truth > 0).astype(np.float32), truth.shape)
    settings = DecodeSettings(min_size=50, resolution=resolution)
    labels, _ = decode_output(output, settings, offsets_for(3))
    assert labels.shape == truth.shape
    if resolution == "full":
        assert relabel_equal(labels, truth)
    else:
        assert evaluate(truth, labels)["f1@0.5"] == 1.0
