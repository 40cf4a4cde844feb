"""Instance-segmentation metrics on integer label images (0 = background).

All scores come from one sparse contingency table of (gt id, pred id) pixel
pairs, so an image of 520x696 pixels with 200 objects takes a few milliseconds.

Conventions, decided once for every metric:

* A GT/prediction pair matches when IoU >= threshold (as in StarDist), one to
  one.  For thresholds >= 0.5 a pair can only conflict with others through an
  exact IoU tie at 0.5, so greedy matching by IoU is optimal; below 0.5 the
  matching is a linear assignment maximising the number of matches (StarDist's).
* Both images empty: every score is 1.0 (perfect) and |DiC| is 0.
  Exactly one image empty: acc, F1, PQ, DQ, SQ, AJI and SBD are all 0.
  SQ is 0 whenever nothing is matched.
* Label ids need not be sequential; labels must be non-negative integers and
  the two images must have the same shape, otherwise ValueError.
* Dataset scores (`mean_metrics`) are means of per-image scores.
* Every function takes label arrays of any dimension: 2D images and 3D (Z,Y,X) volumes alike.

EM neurite scores (`variation_of_information`, `adapted_rand_error`, `em_scores`) follow the
connectomics convention: every voxel belongs to a segment, GT voxels of id 0 (the space between
neurites) are not scored, and a predicted 0 is a segment like any other. Both come from one compact
contingency table, so label ids may be arbitrarily large: ARAND through ``skimage.metrics``, VOI
with the same formula as ``skimage.metrics.variation_of_information`` (whose table argument does not
work alone), cross-checked against it in the tests. VOI is in bits; split = H(pred | gt)
(over-segmentation), merge = H(gt | pred) (under-segmentation).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from skimage.metrics import adapted_rand_error as _skimage_arand

METRIC_KEYS = ("acc@0.5", "f1@0.5", "pq", "dq", "sq", "aji", "sbd", "abs_dic", "n_gt", "n_pred")
EM_KEYS = ("voi_split", "voi_merge", "voi", "arand")
EM_MIN_VOXELS = 100  # EM ground-truth ids under this size are annotation crumbs, dropped before scoring


@dataclass(frozen=True)
class Overlaps:
    """Pixel overlaps between GT objects (rows) and predicted objects (columns)."""

    inter: np.ndarray  # (n_gt, n_pred) intersection areas
    gt_area: np.ndarray  # (n_gt,)
    pred_area: np.ndarray  # (n_pred,)

    @property
    def n_gt(self) -> int:
        """Number of GT objects."""
        return len(self.gt_area)

    @property
    def n_pred(self) -> int:
        """Number of predicted objects."""
        return len(self.pred_area)

    def union(self) -> np.ndarray:
        """(n_gt, n_pred) union areas."""
        return self.gt_area[:, None] + self.pred_area[None, :] - self.inter

    def iou(self) -> np.ndarray:
        """(n_gt, n_pred) intersection over union."""
        return self.inter / self.union()

    def dice(self) -> np.ndarray:
        """(n_gt, n_pred) Dice coefficient."""
        return 2.0 * self.inter / (self.gt_area[:, None] + self.pred_area[None, :])


@dataclass(frozen=True, eq=False)
class Matching:
    """Result of one-to-one matching: counts and the IoUs of matched pairs."""

    tp: int
    fp: int
    fn: int
    matched_ious: np.ndarray = field(repr=False)

    @property
    def mean_matched_iou(self) -> float:
        """Mean IoU of matched pairs (SQ); 1.0 if both images are empty, else 0.0 without matches."""
        if self.tp == 0:
            return float(self.fp == self.fn == 0)
        return float(self.matched_ious.mean())


def _check_labels(gt: np.ndarray, pred: np.ndarray) -> None:
    """Raise ValueError unless gt and pred are same-shaped non-negative integer label images."""
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred must have the same shape, got {gt.shape} and {pred.shape}")
    for name, labels in (("gt", gt), ("pred", pred)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name} must be an integer label image, got dtype {labels.dtype}")
        if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
            raise ValueError(f"{name} contains negative labels; labels must be >= 0 (0 = background)")


def as_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Integer (int64) label image of ``labels``; floats only when every value is a whole number (never truncated)."""
    labels = np.asarray(labels)
    if labels.dtype == bool or np.issubdtype(labels.dtype, np.integer):
        return labels.astype(np.int64, copy=False)
    if not np.issubdtype(labels.dtype, np.floating):
        raise ValueError(f"{name} must be a label image of integers, got dtype {labels.dtype}")
    bad = ~np.isfinite(labels) | (labels != np.round(labels)) | (np.abs(labels) > 2**53)
    if bad.any():
        raise ValueError(f"{name} is a {labels.dtype} image with non-integral values (e.g. {labels[bad].flat[0]!r}); "
                         "label ids must be whole numbers")
    return labels.astype(np.int64)


def overlaps(gt: np.ndarray, pred: np.ndarray) -> Overlaps:
    """Build the GT x prediction overlap table from two label images (background dropped)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    _check_labels(gt, pred)
    base = int(pred.max(initial=0)) + 1
    if (int(gt.max(initial=0)) + 1) * base > 2**64:
        raise ValueError("label ids too large to pair in 64 bits; relabel sequentially first")
    keys, counts = np.unique(gt.ravel().astype(np.uint64) * np.uint64(base) + pred.ravel().astype(np.uint64),
                             return_counts=True)
    gt_ids, pred_ids = keys // np.uint64(base), keys % np.uint64(base)
    gt_objects, pred_objects = np.union1d(gt_ids, [0]), np.union1d(pred_ids, [0])
    table = np.zeros((len(gt_objects), len(pred_objects)), dtype=np.int64)
    table[np.searchsorted(gt_objects, gt_ids), np.searchsorted(pred_objects, pred_ids)] = counts
    return Overlaps(inter=table[1:, 1:], gt_area=table[1:].sum(axis=1), pred_area=table[:, 1:].sum(axis=0))


def _greedy_pairs(iou: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray]:
    """Match pairs with IoU >= thr greedily by decreasing IoU (optimal for thr >= 0.5)."""
    rows, cols = np.nonzero(iou >= thr)
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_rows: set[int] = set()
    used_cols: set[int] = set()
    keep = []
    for k in order:
        if rows[k] not in used_rows and cols[k] not in used_cols:
            used_rows.add(rows[k])
            used_cols.add(cols[k])
            keep.append(k)
    return rows[keep], cols[keep]


def _optimal_pairs(iou: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray]:
    """Match pairs with IoU >= thr maximising their number, IoU breaking ties (StarDist's costs)."""
    if iou.size == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    costs = -(iou >= thr).astype(float) - iou / (2 * min(iou.shape))
    rows, cols = linear_sum_assignment(costs)
    ok = iou[rows, cols] >= thr
    return rows[ok], cols[ok]


def _match(ov: Overlaps, thr: float) -> Matching:
    """One-to-one matching of an overlap table at IoU >= thr."""
    if not 0.0 < thr <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {thr}")
    iou = ov.iou()
    rows, cols = (_greedy_pairs if thr >= 0.5 else _optimal_pairs)(iou, thr)
    tp = len(rows)
    return Matching(tp=tp, fp=ov.n_pred - tp, fn=ov.n_gt - tp, matched_ious=iou[rows, cols])


def _ratio(num: float, den: float) -> float:
    """num / den, with 0/0 = 1.0 (nothing to find and nothing found is perfect)."""
    return 1.0 if den == 0 else float(num / den)


def _acc(m: Matching) -> float:
    """TP / (TP + FP + FN)."""
    return _ratio(m.tp, m.tp + m.fp + m.fn)


def _f1(m: Matching) -> float:
    """2TP / (2TP + FP + FN)."""
    return _ratio(2 * m.tp, 2 * m.tp + m.fp + m.fn)


def _aji(ov: Overlaps) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017) of an overlap table."""
    if ov.n_gt == 0 or ov.n_pred == 0:
        return float(ov.n_gt == ov.n_pred)
    iou, union = ov.iou(), ov.union()
    best = iou.argmax(axis=1)
    paired = np.nonzero(iou[np.arange(ov.n_gt), best] > 0)[0]
    used = np.zeros(ov.n_pred, dtype=bool)
    used[best[paired]] = True
    inter_sum = ov.inter[paired, best[paired]].sum()
    union_sum = (union[paired, best[paired]].sum() + ov.gt_area.sum() - ov.gt_area[paired].sum()
                 + ov.pred_area[~used].sum())
    return float(inter_sum / union_sum)


def _sbd(ov: Overlaps) -> float:
    """Symmetric best Dice of an overlap table."""
    if ov.n_gt == 0 or ov.n_pred == 0:
        return float(ov.n_gt == ov.n_pred)
    dice = ov.dice()
    return float(min(dice.max(axis=1).mean(), dice.max(axis=0).mean()))


def _pq(m: Matching) -> tuple[float, float, float]:
    """(PQ, DQ, SQ) from a matching at IoU 0.5."""
    dq, sq = _f1(m), m.mean_matched_iou
    return dq * sq, dq, sq


def match_instances(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> Matching:
    """One-to-one match GT and predicted objects at IoU >= iou_threshold, to count TP/FP/FN."""
    return _match(overlaps(gt, pred), iou_threshold)


def acc_at(gt: np.ndarray, pred: np.ndarray, thr: float = 0.5) -> float:
    """TP/(TP+FP+FN) at IoU >= thr ("AP50" in the nucleus literature, here acc@0.5)."""
    return _acc(match_instances(gt, pred, thr))


def f1_at(gt: np.ndarray, pred: np.ndarray, thr: float = 0.5) -> float:
    """Detection F1 = 2TP/(2TP+FP+FN) at IoU >= thr."""
    return _f1(match_instances(gt, pred, thr))


def panoptic_quality(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """(PQ, DQ, SQ): DQ = F1@0.5, SQ = mean IoU of matched pairs, PQ = DQ*SQ (Kirillov et al.)."""
    return _pq(match_instances(gt, pred, 0.5))


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar/MoNuSeg): penalises both splits and merges at pixel level."""
    return _aji(overlaps(gt, pred))


def sbd(gt: np.ndarray, pred: np.ndarray) -> float:
    """Symmetric best Dice min(BD(P,G), BD(G,P)), the CVPPP leaf-segmentation score."""
    return _sbd(overlaps(gt, pred))


def abs_dic(gt: np.ndarray, pred: np.ndarray) -> float:
    """|#objects(pred) - #objects(gt)|, the absolute difference in count."""
    ov = overlaps(gt, pred)
    return float(abs(ov.n_pred - ov.n_gt))


def evaluate(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """All metrics of one image pair from a single overlap table, keyed by METRIC_KEYS."""
    ov = overlaps(gt, pred)
    m = _match(ov, 0.5)
    pq, dq, sq = _pq(m)
    return {
        "acc@0.5": _acc(m),
        "f1@0.5": _f1(m),
        "pq": pq,
        "dq": dq,
        "sq": sq,
        "aji": _aji(ov),
        "sbd": _sbd(ov),
        "abs_dic": float(abs(ov.n_pred - ov.n_gt)),
        "n_gt": float(ov.n_gt),
        "n_pred": float(ov.n_pred),
    }


def mean_metrics(per_image: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Dataset scores as per-image means (every image weighs the same, whatever its object count)."""
    if not per_image:
        raise ValueError("mean_metrics needs at least one per-image result")
    keys = list(per_image[0])
    if any(set(m) != set(keys) for m in per_image):
        raise ValueError("all per-image results must have the same keys")
    return {k: float(np.mean([m[k] for m in per_image])) for k in keys}


def drop_small_ids(labels: np.ndarray, min_voxels: int = EM_MIN_VOXELS) -> np.ndarray:
    """Copy of ``labels`` with every id covering fewer than ``min_voxels`` voxels set to 0 (annotation crumbs)."""
    labels = np.asarray(labels)
    _check_labels(labels, labels)
    ids, inverse, counts = np.unique(labels.ravel(), return_inverse=True, return_counts=True)
    keep = np.where(counts >= min_voxels, ids, 0).astype(labels.dtype)
    return keep[inverse].reshape(labels.shape)


def contingency(pred: np.ndarray, gt: np.ndarray, ignore_gt: Sequence[int] = (0,)) -> sparse.csr_array:
    """Sparse (gt segment x pred segment) voxel counts over compact ids; GT voxels with an id in ``ignore_gt`` left out."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    _check_labels(gt, pred)
    scored = ~np.isin(gt.ravel(), np.asarray(ignore_gt, dtype=gt.dtype))
    if not scored.any():
        raise ValueError("gt has no voxels to score (all of them are ignored ids)")
    rows = np.unique(gt.ravel()[scored], return_inverse=True)[1].ravel()
    cols = np.unique(pred.ravel()[scored], return_inverse=True)[1].ravel()
    counts = np.ones(len(rows), dtype=np.int64)
    return sparse.coo_array((counts, (rows, cols)), shape=(rows.max() + 1, cols.max() + 1)).tocsr()


def _conditional_entropies(table: sparse.csr_array) -> tuple[float, float]:
    """(H(pred | gt), H(gt | pred)) in bits of a (gt x pred) count table."""
    joint = table.data / table.sum()
    rows, cols = table.nonzero()  # same order as table.data for a canonical csr array
    p_gt, p_pred = np.bincount(rows, joint), np.bincount(cols, joint)
    h_joint = -np.sum(joint * np.log2(joint))
    h_gt = -np.sum(p_gt[p_gt > 0] * np.log2(p_gt[p_gt > 0]))
    h_pred = -np.sum(p_pred[p_pred > 0] * np.log2(p_pred[p_pred > 0]))
    return max(0.0, float(h_joint - h_gt)), max(0.0, float(h_joint - h_pred))


def variation_of_information(pred: np.ndarray, gt: np.ndarray, ignore_gt: Sequence[int] = (0,)) -> tuple[float, float]:
    """(split, merge) in bits: H(pred | gt) counts false splits, H(gt | pred) false merges; their sum is the VOI."""
    return _conditional_entropies(contingency(pred, gt, ignore_gt))


def adapted_rand_error(pred: np.ndarray, gt: np.ndarray, ignore_gt: Sequence[int] = (0,)) -> float:
    """Adapted Rand error (1 - Rand F-score of voxel pairs; SNEMI3D/CREMI): 0 is perfect."""
    error, _, _ = _skimage_arand(table=contingency(pred, gt, ignore_gt))
    return float(error)


def em_scores(pred: np.ndarray, gt: np.ndarray, min_voxels: int = EM_MIN_VOXELS) -> dict[str, float]:
    """VOI split/merge/sum and ARAND of an EM segmentation, GT ids under ``min_voxels`` dropped first; keyed by EM_KEYS."""
    gt = drop_small_ids(gt, min_voxels)
    table = contingency(pred, gt)
    split, merge = _conditional_entropies(table)
    return {"voi_split": split, "voi_merge": merge, "voi": split + merge,
            "arand": float(_skimage_arand(table=table)[0])}
