"""Volume metrics: VOI and adapted Rand error (hand-computed and against skimage), small-id dropping, 3D F1/AJI."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error as skimage_arand
from skimage.metrics import variation_of_information as skimage_voi

from napari_graphkd.metrics import (
    EM_KEYS,
    adapted_rand_error,
    aji,
    drop_small_ids,
    em_scores,
    evaluate,
    f1_at,
    variation_of_information,
)

ONE = np.ones((2, 2, 2), dtype=int)  # one 8-voxel object
HALVES = ONE.copy()
HALVES[1] = 2  # the object cut into two 4-voxel slices along z
QUARTERS = np.arange(4).repeat(2).reshape(2, 2, 2) + 1  # four 2-voxel pieces


def test_voi_of_a_split_in_halves_is_one_bit_of_split():
    assert variation_of_information(HALVES, ONE) == pytest.approx((1.0, 0.0))


def test_voi_of_a_merge_of_halves_is_one_bit_of_merge():
    assert variation_of_information(ONE, HALVES) == pytest.approx((0.0, 1.0))


def test_voi_of_four_equal_pieces_is_two_bits():
    assert variation_of_information(QUARTERS, ONE) == pytest.approx((2.0, 0.0))


def test_voi_and_arand_are_zero_for_the_same_partition_with_other_ids():
    other_ids = np.where(HALVES == 1, 10**12, 7)
    assert variation_of_information(other_ids, HALVES) == pytest.approx((0.0, 0.0))
    assert adapted_rand_error(other_ids, HALVES) == pytest.approx(0.0)


def test_gt_background_is_not_scored_but_predicted_zero_is_a_segment():
    gt = np.array([[0, 0, 1, 1], [0, 0, 2, 2]])
    anything_on_gt_background = np.array([[5, 6, 1, 1], [7, 8, 2, 2]])
    assert variation_of_information(anything_on_gt_background, gt) == pytest.approx((0.0, 0.0))
    zero_everywhere = np.zeros_like(gt)  # one segment holding both objects: a merge of two halves
    assert variation_of_information(zero_everywhere, gt) == pytest.approx((0.0, 1.0))


def test_arand_of_a_merge_of_two_equal_objects_is_one_half():
    # voxel pairs (ordered, distinct): within GT objects 2*(2*1) = 4, within the one predicted segment 4*3 = 12,
    # in both 4: Rand F-score 2*4 / (4 + 12) = 0.5, error 0.5 (the same for the reverse split)
    gt = np.array([1, 1, 2, 2])
    assert adapted_rand_error(np.ones(4, dtype=int), gt) == pytest.approx(0.5)
    assert adapted_rand_error(gt, np.ones(4, dtype=int)) == pytest.approx(0.5)


def test_drop_small_ids_zeroes_only_ids_under_the_size():
    labels = np.array([[[3, 3, 3, 9], [0, 0, 5, 5]]])
    assert drop_small_ids(labels, min_voxels=3).tolist() == [[[3, 3, 3, 0], [0, 0, 0, 0]]]
    assert drop_small_ids(labels, min_voxels=2).tolist() == [[[3, 3, 3, 0], [0, 0, 5, 5]]]
    assert drop_small_ids(labels, min_voxels=2).dtype == labels.dtype


def test_em_scores_drop_gt_crumbs_before_scoring():
    gt = np.zeros((4, 10, 10), dtype=np.uint16)
    gt[:, :, :5], gt[:, :, 5:] = 1, 2
    gt[0, 0, 0] = 3  # a one-voxel crumb, split off in the GT only
    pred = np.where(gt == 2, 2, 1)
    scores = em_scores(pred, gt, min_voxels=100)
    assert tuple(scores) == EM_KEYS
    assert scores == pytest.approx({"voi_split": 0.0, "voi_merge": 0.0, "voi": 0.0, "arand": 0.0})
    assert em_scores(pred, gt, min_voxels=1)["voi_merge"] > 0  # kept, the crumb is merged into object 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voi_and_arand_match_skimage_on_random_volumes(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 6, (5, 8, 9))
    pred = rng.integers(0, 9, (5, 8, 9)) * 1000 + gt * (seed > 0)  # partly correlated, large ids
    assert variation_of_information(pred, gt) == pytest.approx(tuple(skimage_voi(gt, pred, ignore_labels=(0,))))
    assert variation_of_information(pred, gt, ignore_gt=()) == pytest.approx(tuple(skimage_voi(gt, pred)))
    assert adapted_rand_error(pred, gt) == pytest.approx(skimage_arand(gt, pred, ignore_labels=(0,))[0])
    assert adapted_rand_error(pred, gt, ignore_gt=()) == pytest.approx(skimage_arand(gt, pred, ignore_labels=())[0])


def test_volume_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        variation_of_information(np.ones((2, 3), int), np.ones((3, 2), int))
    with pytest.raises(ValueError, match="no voxels to score"):
        adapted_rand_error(np.ones((2, 2), int), np.zeros((2, 2), int))


def test_f1_and_aji_count_objects_in_3d():
    # GT: two 2x2x2 cubes. Prediction: cube A exact; cube B found in one z plane only (IoU 0.5) plus
    # a false 1-voxel object: TP 2, FP 1 -> F1 = 4/5; AJI = (8 + 4) / (8 + 8 + 1) = 12/17.
    gt = np.zeros((2, 4, 6), dtype=int)
    gt[:, :2, :2], gt[:, 2:, 4:] = 1, 2
    pred = np.zeros_like(gt)
    pred[:, :2, :2] = 4
    pred[0, 2:, 4:] = 7
    pred[1, 0, 5] = 9
    assert f1_at(gt, pred) == pytest.approx(0.8)
    assert aji(gt, pred) == pytest.approx(12 / 17)
    # an object counts once through the volume, not once per plane: per-plane ids give 4 objects, of
    # which one half of each cube matches it (IoU 0.5) and the other is false: F1 = 4 / (4 + 2)
    per_plane = gt + 10 * np.arange(2)[:, None, None] * (gt > 0)
    assert evaluate(gt, per_plane)["n_pred"] == 4.0
    assert f1_at(gt, per_plane) == pytest.approx(2 / 3)
