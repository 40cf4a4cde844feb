"""Mutex-watershed decoding of affinities into instance labels, with background and fragment rules.

Sign convention (METHOD.md A.8): ``mwatershed.agglom`` wants signed weights, positive = attract,
negative = repel, processed in order of decreasing magnitude. Our affinities are cosines in
[-1, 1] with target 1 (same object) / 0 (different objects). Nearest-neighbour channels become
``aff - attractive_bias`` (attractive where the pixels agree) and long-range channels become
``aff - 1`` (never attractive, repelling with strength ``1 - aff``). Long-range edges are
subsampled on a stride grid: faster, and less split-prone on noisy embeddings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import mwatershed
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels, relabel_sequential

from ..affinity import OFFSETS


@dataclass(frozen=True)
class DecodeSettings:
    """Decoder knobs; all sizes are in pixels at the model's training scale."""

    attractive_bias: float = 0.3
    long_range_stride: int = 4
    randomized_strides: bool = False
    foreground_threshold: float = 0.5
    min_size: int = 60
    merge_distance: int = 3
    resolution: str = "full"  # "half"/"quarter": decode on a 2x/4x coarser grid, outlines placed at full resolution

    def to_dict(self) -> dict:
        """JSON-friendly dict (stored in checkpoint metadata and layer provenance)."""
        return asdict(self)


def signed_weights(affinities: np.ndarray, offsets=OFFSETS, attractive_bias: float = 0.3) -> np.ndarray:
    """Affinities (K,H,W) in [-1,1] to mutex-watershed edge weights (float64)."""
    weights = np.empty(affinities.shape, dtype=np.float64)
    for k, off in enumerate(offsets):
        short = max(abs(o) for o in off) == 1
        weights[k] = affinities[k] - (attractive_bias if short else 1.0)
    return weights


def mutex_watershed(
    affinities: np.ndarray, offsets=OFFSETS, attractive_bias: float = 0.3, stride: int = 4, randomized: bool = False
) -> np.ndarray:
    """Over-complete segmentation (H,W) uint64 from affinities with mwatershed, long-range edges strided."""
    weights = signed_weights(affinities, offsets, attractive_bias)
    strides = [[1, 1] if max(abs(o) for o in off) == 1 else [stride, stride] for off in offsets]
    return mwatershed.agglom(weights, [list(o) for o in offsets], strides=strides, randomized_strides=randomized)


def remove_background(segments: np.ndarray, foreground: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Zero every segment whose mean foreground probability is below ``threshold`` (int64 labels)."""
    seg = relabel_sequential(segments.astype(np.int64))[0]
    counts = np.bincount(seg.ravel())
    sums = np.bincount(seg.ravel(), weights=foreground.ravel().astype(np.float64), minlength=len(counts))
    keep = sums / np.maximum(counts, 1) >= threshold
    keep[0] = False
    return np.where(keep[seg], seg, 0)


def merge_fragments(labels: np.ndarray, min_size: int, distance: int) -> np.ndarray:
    """Hand segments smaller than ``min_size`` to the nearest kept object within ``distance`` px, else drop."""
    counts = np.bincount(labels.ravel())
    small = counts < min_size
    small[0] = False
    if not small.any():
        return labels
    fragment = small[labels]
    kept = np.where(fragment, 0, labels)
    grown = expand_labels(kept, distance) if distance > 0 else kept
    return np.where(fragment, grown, kept)


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill background holes enclosed by objects (nuclei have none): each hole takes a rim object's id."""
    mask = labels > 0
    holes = ndi.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return labels
    hole_ids, n = ndi.label(holes)
    rim_hole = ndi.maximum_filter(hole_ids, size=3)
    rim = (rim_hole > 0) & mask
    owner = np.zeros(n + 1, dtype=labels.dtype)
    owner[rim_hole[rim]] = labels[rim]
    return np.where(holes, owner[hole_ids], labels)


def drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Remove objects smaller than ``min_size`` px and relabel 1..N."""
    counts = np.bincount(labels.ravel())
    small = counts < min_size
    small[0] = False
    if small.any():
        labels = np.where(small[labels], 0, labels)
    return relabel_sequential(labels)[0] if small.any() or (counts[1:] == 0).any() else labels


def decode(affinities: np.ndarray, foreground: np.ndarray | None, settings: DecodeSettings = DecodeSettings()) -> np.ndarray:
    """Instance labels (H,W) int32, 0 = background, from affinities (K,H,W) and foreground probability.

    Background rule: a segment is background when its mean foreground probability is below the
    threshold (a learned head, so it holds beyond BBBC039). Without a foreground head, the segment
    covering most image border pixels is taken as background (one connected background).
    """
    segments = mutex_watershed(
        affinities, OFFSETS, settings.attractive_bias, settings.long_range_stride, settings.randomized_strides
    )
    if foreground is not None:
        labels = remove_background(segments, foreground, settings.foreground_threshold)
    else:
        labels = remove_border_background(segments)
    labels = merge_fragments(labels, settings.min_size, settings.merge_distance)
    labels = fill_holes(labels)
    return relabel_sequential(labels)[0].astype(np.int32)


def refine_upsampled(coarse: np.ndarray, foreground: np.ndarray | None, shape: tuple[int, int],
                     settings: DecodeSettings, band: int = 2) -> np.ndarray:
    """Labels decoded on a coarse grid, brought to ``shape`` with full-resolution outlines.

    Nearest upsampling puts outlines on the coarse grid. Within ``band`` px of any outline the
    full-resolution foreground probability decides: a pixel is background below the threshold,
    else it belongs to its own object or, if it was background, to the neighbouring object.
    Interiors keep their coarse label, so no holes appear.
    """
    zoom = [n / c for n, c in zip(shape, coarse.shape)]
    labels = ndi.zoom(coarse, zoom, order=0, grid_mode=True, mode="nearest")[: shape[0], : shape[1]]
    if foreground is None:
        return labels.astype(np.int32)
    high = ndi.maximum_filter(labels, size=2 * band + 1)
    near_outline = high != ndi.minimum_filter(labels, size=2 * band + 1)
    grown = np.where(labels > 0, labels, high)
    labels = np.where(near_outline, np.where(foreground >= settings.foreground_threshold, grown, 0), labels)
    return drop_small(labels, settings.min_size).astype(np.int32)


def remove_border_background(segments: np.ndarray) -> np.ndarray:
    """Background = the segment owning most border pixels (for networks without a foreground head)."""
    seg = relabel_sequential(segments.astype(np.int64))[0]
    border = np.concatenate([seg[0], seg[-1], seg[:, 0], seg[:, -1]])
    background = np.bincount(border).argmax()
    return np.where(seg == background, 0, seg)
