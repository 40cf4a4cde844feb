"""Volume baselines on synthetic volumes: 3D Otsu + watershed, seeded watershed on boundaries, plane linking."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_graphkd.decode.volume_baselines import (
    NucleiSettings,
    SeededSettings,
    dark_membrane_boundaries,
    fill_background,
    link_planes,
    merge_small_segments,
    otsu_watershed_3d,
    seeded_watershed,
)
from napari_graphkd.metrics import em_scores, evaluate


def _balls(voxel_size: tuple[float, float, float]) -> np.ndarray:
    """Two touching balls of radius 8 px (physical) along x, sampled on a grid of ``voxel_size``."""
    shape = (int(24 / voxel_size[0]), 24, 40)
    z, y, x = np.ogrid[tuple(slice(0, n) for n in shape)]
    zz = z * voxel_size[0]
    labels = np.zeros(shape, dtype=np.int32)
    for k, cx in enumerate((12, 27)):
        inside = (zz - 12) ** 2 + (y - 12) ** 2 + (x - cx) ** 2 <= 64
        labels[inside & (labels == 0)] = k + 1
    return labels


@pytest.mark.parametrize("voxel_size", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)])
def test_otsu_watershed_3d_separates_touching_nuclei_at_any_anisotropy(voxel_size):
    gt = _balls(voxel_size)
    image = np.where(gt > 0, 200, 20).astype(np.uint8) + np.random.default_rng(0).integers(0, 10, gt.shape, dtype=np.uint8)
    labels = otsu_watershed_3d(image, voxel_size, NucleiSettings(sigma=1.0, min_distance=6, min_size=50))
    scores = evaluate(gt, labels)
    assert scores["n_pred"] == 2 and scores["f1@0.5"] == 1.0
    assert scores["aji"] > 0.85


def test_otsu_watershed_3d_of_a_flat_volume_is_empty_and_2d_input_is_refused():
    assert not otsu_watershed_3d(np.full((4, 5, 6), 7, np.uint8)).any()
    with pytest.raises(ValueError, match="Z,Y,X"):
        otsu_watershed_3d(np.zeros((5, 6)), (1.0, 1.0))


def _cells() -> tuple[np.ndarray, np.ndarray]:
    """(raw, gt): four box-shaped cells filling a 12x30x30 volume, with 1-voxel dark membranes between them."""
    gt = np.zeros((12, 30, 30), dtype=np.int32)
    gt[:, :15, :15], gt[:, :15, 15:], gt[:, 15:, :12], gt[:, 15:, 12:] = 1, 2, 3, 4
    membrane = ndi.morphological_gradient(gt, size=(1, 2, 2)) > 0
    raw = np.where(membrane, 40, 180).astype(np.uint8)
    return raw, np.where(membrane, 0, gt)


def test_seeded_watershed_on_dark_membranes_recovers_the_cells():
    raw, gt = _cells()
    boundaries = dark_membrane_boundaries(raw, sigma=0.5)
    assert boundaries[gt == 0].mean() > 0.9 and boundaries[gt > 0].mean() < 0.1
    labels = seeded_watershed(boundaries, settings=SeededSettings(threshold=0.5, seed_smooth=1.0, h=1.0, min_size=100))
    assert labels.min() >= 1  # every voxel belongs to a segment
    assert labels.max() == 4
    assert em_scores(labels, gt, min_voxels=1) == pytest.approx({"voi_split": 0, "voi_merge": 0, "voi": 0, "arand": 0})


def test_seeded_watershed_without_interior_is_one_segment_and_checks_the_voxel_size():
    assert seeded_watershed(np.ones((3, 4, 5), np.float32)).tolist() == np.ones((3, 4, 5), int).tolist()
    with pytest.raises(ValueError, match="voxel size"):
        seeded_watershed(np.ones((4, 5), np.float32))


def test_merge_small_segments_gives_small_ones_to_the_neighbour_across_the_weaker_boundary():
    labels = np.array([[1, 1, 1, 2, 3, 3, 3]])
    boundaries = np.array([[0, 0, 0, 0, 0.9, 0, 0]], dtype=np.float32)  # a strong wall between 2 and 3
    assert merge_small_segments(boundaries, labels, min_size=2).tolist() == [[1, 1, 1, 1, 3, 3, 3]]
    assert merge_small_segments(boundaries, labels, min_size=1).tolist() == labels.tolist()


def test_link_planes_follows_overlapping_objects_through_z():
    planes = np.zeros((3, 4, 8), dtype=np.int32)
    planes[0, :, 0:3] = 5  # object A, shifting right by one pixel per plane (IoU 0.5)
    planes[1, :, 1:4] = 2
    planes[2, :, 2:5] = 9
    planes[1, :, 6:8] = 7  # object B appears in plane 1
    planes[2, :, 6:8] = 1
    linked = link_planes(planes, min_iou=0.3)
    assert np.unique(linked[:, :, 0:5][planes[:, :, 0:5] > 0]).tolist() == [1]  # A: one id in every plane
    assert np.unique(linked[1:, :, 6:8]).tolist() == [2]  # B: a second id
    assert (linked == 0).sum() == (planes == 0).sum()
    strict = link_planes(planes, min_iou=0.6)  # A's IoU 0.5 between planes is too little: a new id per plane
    assert len(np.unique(strict[planes > 0])) == 4
    sized = link_planes(planes, min_iou=0.3, min_size=17)  # A has 36 voxels, B 16: B is dropped
    assert np.unique(sized).tolist() == [0, 1] and (sized[:, :, 6:8] == 0).all()


def test_link_planes_continues_a_split_object_in_its_best_overlapping_piece_only():
    planes = np.zeros((2, 2, 6), dtype=np.int32)
    planes[0, :, :] = 1
    planes[1, :, :4], planes[1, :, 4:] = 1, 2  # the object splits: IoU 4/6 and 2/6 with plane 0
    linked = link_planes(planes, min_iou=0.3)
    assert linked[1].tolist() == [[1, 1, 1, 1, 2, 2]] * 2


def test_link_planes_refuses_2d_input_and_bad_thresholds():
    with pytest.raises(ValueError, match="Z,Y,X"):
        link_planes(np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="min_iou"):
        link_planes(np.zeros((2, 4, 4), int), min_iou=0.0)


def test_fill_background_gives_unassigned_voxels_their_nearest_segment():
    labels = np.array([[[1, 0, 0, 2]], [[0, 0, 0, 0]]])
    filled = fill_background(labels)
    assert filled.tolist() == [[[1, 1, 2, 2]], [[1, 1, 2, 2]]]
    # with z voxels 3x coarser, a voxel one plane away is farther than one two pixels away in-plane
    column = np.zeros((2, 1, 3), dtype=int)
    column[1, 0, 0], column[0, 0, 2] = 5, 6
    assert fill_background(column, (3.0, 1.0, 1.0))[0, 0, 0] == 6
    assert fill_background(column, (1.0, 1.0, 1.0))[0, 0, 0] == 5
    assert not fill_background(np.zeros((2, 2, 2), int)).any()
