"""Hand-computed instance metrics, edge cases, and a cross-check against StarDist."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from napari_graphkd.evaluation import selection_score
from napari_graphkd.io.datasets import env_data_root
from napari_graphkd.metrics import (
    METRIC_KEYS,
    abs_dic,
    acc_at,
    aji,
    evaluate,
    f1_at,
    match_instances,
    mean_metrics,
    panoptic_quality,
    sbd,
)
from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample
from napari_graphkd.segment import load_segmenter, segment_any

DATA_ROOT = env_data_root()  # folder laid out by `graphkd data`, from $GRAPHKD_DATA

# A: 2x2 = 4 px (top left), B: 3x3 = 9 px (bottom right).
TWO = np.array([
    [1, 1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 2, 2, 2],
    [0, 0, 0, 2, 2, 2],
    [0, 0, 0, 2, 2, 2],
])
ONLY_A = np.where(TWO == 1, 1, 0)
# One 2x6 = 12 px bar, and the same bar cut into 8 px (left) + 4 px (right).
BAR = np.zeros((6, 6), dtype=int)
BAR[:2] = 1
CUT = BAR.copy()
CUT[:2, 4:] = 2
EMPTY = np.zeros((6, 6), dtype=int)


def _check(gt: np.ndarray, pred: np.ndarray, expected: dict[str, float]) -> None:
    """evaluate() and every single-metric function agree with the hand-computed values."""
    result = evaluate(gt, pred)
    assert tuple(result) == METRIC_KEYS
    assert result == pytest.approx(expected)
    assert acc_at(gt, pred) == pytest.approx(expected["acc@0.5"])
    assert f1_at(gt, pred) == pytest.approx(expected["f1@0.5"])
    assert panoptic_quality(gt, pred) == pytest.approx((expected["pq"], expected["dq"], expected["sq"]))
    assert aji(gt, pred) == pytest.approx(expected["aji"])
    assert sbd(gt, pred) == pytest.approx(expected["sbd"])
    assert abs_dic(gt, pred) == expected["abs_dic"]


def _expected(acc, f1, sq, aji_, sbd_, dic, n_gt, n_pred) -> dict[str, float]:
    """Metric dict with PQ = DQ * SQ and DQ = F1."""
    return {"acc@0.5": acc, "f1@0.5": f1, "pq": f1 * sq, "dq": f1, "sq": sq, "aji": aji_, "sbd": sbd_,
            "abs_dic": dic, "n_gt": n_gt, "n_pred": n_pred}


def test_perfect_match_with_other_ids():
    # Same objects, different ids: every IoU/Dice is 1 -> all scores 1, |DiC| 0.
    pred = np.select([TWO == 1, TWO == 2], [7, 3], 0)
    _check(TWO, pred, _expected(1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2, 2))


def test_split():
    # GT bar (12 px) vs preds L (8 px, IoU 8/12) and R (4 px, IoU 4/12).
    # TP=1 (bar-L), FP=1 (R), FN=0: acc 1/2, F1 2/3, SQ 2/3, PQ 4/9.
    # AJI: bar takes L: I=8, U=12; R unused adds 4 -> 8/16.
    # Dice(bar,L) = 16/20 = 0.8, Dice(bar,R) = 8/16 = 0.5.
    # BD(G,P) = 0.8, BD(P,G) = (0.8+0.5)/2 = 0.65 -> SBD 0.65.
    _check(BAR, CUT, _expected(1 / 2, 2 / 3, 2 / 3, 8 / 16, 0.65, 1.0, 1, 2))


def test_merge():
    # GT L (8 px) and R (4 px) vs one pred bar (12 px): IoUs 8/12 and 4/12.
    # TP=1, FP=0, FN=1: acc 1/2, F1 2/3, SQ 2/3, PQ 4/9.
    # AJI: both GT take the bar (reuse allowed): I = 8+4, U = 12+12 -> 1/2.
    # BD(G,P) = (0.8+0.5)/2 = 0.65, BD(P,G) = 0.8 -> SBD 0.65.
    _check(CUT, BAR, _expected(1 / 2, 2 / 3, 2 / 3, 12 / 24, 0.65, 1.0, 2, 1))


def test_missed_object():
    # GT A (4 px), B (9 px); pred A only. TP=1, FN=1: acc 1/2, F1 2/3, SQ 1, PQ 2/3.
    # AJI: A: I=4, U=4; B overlaps nothing, adds 9 to U -> 4/13.
    # BD(G,P) = (1+0)/2, BD(P,G) = 1 -> SBD 1/2.
    _check(TWO, ONLY_A, _expected(1 / 2, 2 / 3, 1.0, 4 / 13, 0.5, 1.0, 2, 1))


def test_false_positive():
    # Mirror of the missed case: TP=1, FP=1; unused pred B adds 9 to U -> AJI 4/13.
    _check(ONLY_A, TWO, _expected(1 / 2, 2 / 3, 1.0, 4 / 13, 0.5, 1.0, 1, 2))


def test_non_sequential_ids_give_same_scores():
    gt = np.where(BAR > 0, 2**40, 0).astype(np.int64)
    pred = np.select([CUT == 1, CUT == 2], [65535, 9], 0).astype(np.uint16)
    assert evaluate(gt, pred) == evaluate(BAR, CUT)


def test_empty_gt_with_predictions_scores_zero():
    _check(EMPTY, TWO, _expected(0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0, 2))


def test_empty_prediction_scores_zero():
    _check(TWO, EMPTY, _expected(0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2, 0))


def test_both_empty_is_perfect():
    _check(EMPTY, EMPTY, _expected(1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0, 0))


def test_low_threshold_uses_optimal_assignment():
    # 1x13 strip. GT g1 = [0,10), g2 = [10,13); pred p2 = [0,3), p1 = [3,13).
    # IoU(g1,p1) = 7/13, IoU(g1,p2) = 3/10, IoU(g2,p1) = 3/10, IoU(g2,p2) = 0.
    # At 0.25 greedy would take only g1-p1; the optimum pairs g1-p2 and g2-p1.
    gt = np.array([[1] * 10 + [2] * 3])
    pred = np.array([[2] * 3 + [1] * 10])
    low = match_instances(gt, pred, iou_threshold=0.25)
    assert (low.tp, low.fp, low.fn) == (2, 0, 0)
    assert sorted(low.matched_ious) == pytest.approx([0.3, 0.3])
    high = match_instances(gt, pred, iou_threshold=0.5)
    assert (high.tp, high.fp, high.fn) == (1, 1, 1)
    assert high.mean_matched_iou == pytest.approx(7 / 13)


@pytest.mark.parametrize(
    ("gt", "pred", "message"),
    [
        (TWO, TWO[:5], "same shape"),
        (TWO.astype(float), TWO, "integer"),
        (TWO, TWO > 0, "integer"),
        (TWO, -TWO, "negative"),
    ],
)
def test_invalid_labels_raise(gt, pred, message):
    with pytest.raises(ValueError, match=message):
        evaluate(gt, pred)


def test_invalid_threshold_raises():
    with pytest.raises(ValueError, match="iou_threshold"):
        match_instances(TWO, TWO, iou_threshold=0.0)


def test_mean_metrics_is_per_image_mean():
    means = mean_metrics([evaluate(TWO, TWO), evaluate(TWO, ONLY_A)])
    assert means["f1@0.5"] == pytest.approx((1 + 2 / 3) / 2)
    assert means["n_gt"] == 2.0
    with pytest.raises(ValueError):
        mean_metrics([])


def _perturb(gt: np.ndarray) -> np.ndarray:
    """A plausible bad prediction: dropped, eroded, split, extra and shifted objects with gappy ids."""
    ids = np.unique(gt)[1:]
    pred = np.where(np.isin(gt, ids[::7]), 0, gt)
    for i in ids[1::5]:
        obj = pred == i
        pred[obj & ~ndi.binary_erosion(obj, iterations=2)] = 0
    split = pred == ids[2]
    cols = np.nonzero(split)[1]
    pred[split & (np.arange(gt.shape[1])[None, :] > np.median(cols))] = ids.max() + 1
    pred[:5, :5] = ids.max() + 2
    pred = np.roll(pred, (2, 1), axis=(0, 1))
    return np.where(pred > 0, 3 * pred.astype(np.int64) + 5, 0)


def _compare_with_stardist(gt: np.ndarray, pred: np.ndarray) -> None:
    """Our matching scores equal StarDist's on gt vs a prediction, at three thresholds."""
    stardist_matching = pytest.importorskip("stardist.matching")
    for thr in (0.3, 0.5, 0.7):
        ref = stardist_matching.matching(gt, pred, thresh=thr)
        ours = match_instances(gt, pred, iou_threshold=thr)
        assert (ours.tp, ours.fp, ours.fn) == (ref.tp, ref.fp, ref.fn)
        assert ours.tp > 0
        assert acc_at(gt, pred, thr) == pytest.approx(ref.accuracy)
        assert f1_at(gt, pred, thr) == pytest.approx(ref.f1)
        assert ours.mean_matched_iou == pytest.approx(ref.mean_matched_score, rel=1e-5)
    ref = stardist_matching.matching(gt, pred, thresh=0.5)
    assert panoptic_quality(gt, pred)[0] == pytest.approx(ref.panoptic_quality, rel=1e-5)


def test_matches_stardist_on_bbbc039():
    if DATA_ROOT is None:
        pytest.skip("set GRAPHKD_DATA to the folder laid out by `graphkd data` to cross-check on BBBC039 val")
    files = sorted((DATA_ROOT / "bbbc039" / "val" / "labels").glob("*.tif"))
    if not files:
        pytest.skip(f"no BBBC039 val labels under {DATA_ROOT / 'bbbc039'}: lay the data out with `graphkd data`")
    for path in files[:2]:
        gt = tifffile.imread(path)
        _compare_with_stardist(gt, _perturb(gt))


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_matches_stardist_on_a_models_labels_of_the_bundled_samples(name):
    """Ground truth vs the bundled student's real prediction (misses, merges, splits as a network makes them)."""
    pytest.importorskip("stardist.matching")
    image, gt = load_sample(name)
    pred = segment_any(load_segmenter("student"), image).labels
    assert 0 < match_instances(gt, pred).fp + match_instances(gt, pred).fn  # an imperfect prediction: every count is exercised
    _compare_with_stardist(gt, pred)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_matches_stardist_on_perturbed_bundled_samples(name):
    """Ground truth vs a perturbed copy with gappy, non-sequential ids."""
    gt = load_sample(name)[1]
    _compare_with_stardist(gt, _perturb(gt))


def test_selection_score_pools_objects_so_one_empty_image_does_not_decide():
    """Hand-computed: 8 of 10 nuclei found with 2 false objects, plus 1 false object on an empty image."""
    with_nuclei = {"f1@0.5": 0.8, "aji": 0.7, "n_gt": 10.0, "n_pred": 10.0}  # TP 8, FP 2, FN 2
    empty_with_one_object = {"f1@0.5": 0.0, "aji": 0.0, "n_gt": 0.0, "n_pred": 1.0}
    empty_and_nothing = {"f1@0.5": 1.0, "aji": 1.0, "n_gt": 0.0, "n_pred": 0.0}
    # pooled: TP 8, FP 3, FN 2 -> 16 / 21; AJI only over the image with nuclei
    assert selection_score([with_nuclei, empty_with_one_object]) == pytest.approx(16 / 21 + 0.7)
    assert selection_score([with_nuclei, empty_and_nothing]) == pytest.approx(16 / 20 + 0.7)
    # a per-image mean would move by 0.5 F1 + 0.5 AJI between the two; pooled, one false object moves it by 0.038
    assert selection_score([with_nuclei, empty_and_nothing]) - selection_score([with_nuclei, empty_with_one_object]) < 0.04
