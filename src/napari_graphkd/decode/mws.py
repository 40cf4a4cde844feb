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

from ..affinity import OFFSETS, label_affinities

SUPPORT_THRESHOLD = 0.1  # foreground probability above which a pixel may belong to an object ...
SUPPORT_MARGIN = 2  # ... and grid pixels around such pixels that still enter the graph (benchmarks/results/decoder_support.md)


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


def agglomerate(weights: np.ndarray, offsets=OFFSETS, stride: int = 4, randomized: bool = False) -> np.ndarray:
    """Mutex watershed (H,W) uint64 of signed edge weights, long-range edges strided.

    Offsets longer than the image are skipped (mwatershed cannot take them); a 0 weight is no edge.
    """
    fits = [k for k, off in enumerate(offsets) if all(abs(o) < n for o, n in zip(off, weights.shape[1:]))]
    offsets = [list(offsets[k]) for k in fits]
    strides = [[1, 1] if max(abs(o) for o in off) == 1 else [stride, stride] for off in offsets]
    return mwatershed.agglom(np.ascontiguousarray(weights[fits]), offsets, strides=strides, randomized_strides=randomized)


def mutex_watershed(
    affinities: np.ndarray, offsets=OFFSETS, attractive_bias: float = 0.3, stride: int = 4, randomized: bool = False
) -> np.ndarray:
    """Over-complete segmentation (H,W) uint64 of the whole image from affinities."""
    return agglomerate(signed_weights(affinities, offsets, attractive_bias), offsets, stride, randomized)


def foreground_regions(foreground: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    """Connected regions (ids 1..N) where the foreground head sees any object, with a margin, and their boxes."""
    support = ndi.binary_dilation(foreground >= SUPPORT_THRESHOLD, iterations=SUPPORT_MARGIN)
    regions, _ = ndi.label(support)
    return regions, ndi.find_objects(regions)


def regional_mutex_watershed(
    affinities: np.ndarray, foreground: np.ndarray, attractive_bias: float = 0.3, stride: int = 4, randomized: bool = False
) -> np.ndarray:
    """Mutex watershed run on each foreground region's box alone; pixels outside every region are 0.

    Most pixels of a fluorescence image are background that the foreground head rejects anyway.
    Only edges with both ends in one region are kept, so every region is decoded as if alone;
    leaving the rest out of the graph cuts the mutex watershed's time 2-3x without changing the
    scores (checked on the tune split and val, docs/method-notes.md).
    """
    regions, boxes = foreground_regions(foreground)
    same_region, _ = label_affinities(regions)  # 1 where both ends share a label (0 too)
    in_graph = (same_region > 0) & (regions > 0)
    weights = signed_weights(affinities, OFFSETS, attractive_bias)
    out = np.zeros(foreground.shape, dtype=np.int64)
    next_id = 0
    for region_id, box in enumerate(boxes, start=1):
        inside = regions[box] == region_id
        box_k = (slice(None), *box)
        segments = agglomerate(np.where(in_graph[box_k] & inside, weights[box_k], 0.0), OFFSETS, stride, randomized)
        out[box][inside] = segments[inside].astype(np.int64) + next_id + 1  # ids stay unique; compacted by the caller
        next_id += int(segments.max()) + 1
    return out


def remove_background(segments: np.ndarray, foreground: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Zero every segment whose mean foreground probability is below ``threshold`` (int64, ids kept).

    Segment ids must be bounded by about the pixel count (mutex-watershed ids are), as they index bincounts.
    """
    seg = segments.astype(np.int64, copy=False)
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
    """Fill background holes enclosed by objects (nuclei have none): each hole takes a rim object's id.

    A hole is a 4-connected background component that does not touch the image border (the
    definition ``ndi.binary_fill_holes`` uses), found with one labelling pass.
    """
    background, n = ndi.label(labels == 0)
    enclosed = np.ones(n + 1, dtype=bool)
    enclosed[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = False
    hole_ids = np.where(enclosed[background], background, 0)
    if not hole_ids.any():
        return labels
    rim_hole = ndi.maximum_filter(hole_ids, size=3)
    rim = (rim_hole > 0) & (labels > 0)
    owner = np.zeros(n + 1, dtype=labels.dtype)
    owner[rim_hole[rim]] = labels[rim]
    return np.where(hole_ids > 0, owner[hole_ids], labels)


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
    mws_args = (settings.attractive_bias, settings.long_range_stride, settings.randomized_strides)
    if foreground is not None:
        segments = regional_mutex_watershed(affinities, foreground, *mws_args)
        labels = remove_background(segments, foreground, settings.foreground_threshold)
    else:
        labels = remove_border_background(mutex_watershed(affinities, OFFSETS, *mws_args))
    labels = merge_fragments(labels, settings.min_size, settings.merge_distance)
    labels = fill_holes(labels)
    return relabel_sequential(labels)[0].astype(np.int32)


def refine_upsampled(coarse: np.ndarray, foreground: np.ndarray | None, shape: tuple[int, int],
                     settings: DecodeSettings, factor: int = 2) -> np.ndarray:
    """Labels decoded on a ``factor`` times coarser grid, brought to ``shape`` with full-resolution outlines.

    Coarse pixel (i, j) covers input pixels [i*factor, (i+1)*factor) x [j*factor, (j+1)*factor)
    (the average-pooling grid), so upsampling repeats it. That puts outlines on the coarse grid:
    within ``factor`` px of any outline the full-resolution foreground probability decides: a pixel
    is background below the threshold, else it belongs to its own object or, if it was background,
    to the neighbouring object. Interiors keep their coarse label, so no holes appear.
    """
    def upsample(coarse_map: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(coarse_map, factor, axis=0), factor, axis=1)[: shape[0], : shape[1]]

    labels = upsample(coarse)
    if foreground is None:
        return labels.astype(np.int32)
    # A full-resolution window of +-factor px always spans exactly the 3x3 coarse neighbourhood of
    # its pixel's cell, so 3x3 filters on the coarse grid give the full-resolution band exactly.
    high, low = ndi.maximum_filter(coarse, size=3), ndi.minimum_filter(coarse, size=3)
    near_outline = upsample(high != low)
    grown = upsample(np.where(coarse > 0, coarse, high))
    labels = np.where(near_outline, np.where(foreground >= settings.foreground_threshold, grown, 0), labels)
    return drop_small(labels, settings.min_size).astype(np.int32)


def remove_border_background(segments: np.ndarray) -> np.ndarray:
    """Background = the segment owning most border pixels (for networks without a foreground head)."""
    seg = relabel_sequential(segments.astype(np.int64))[0]
    border = np.concatenate([seg[0], seg[-1], seg[:, 0], seg[:, -1]])
    background = np.bincount(border).argmax()
    return np.where(seg == background, 0, seg)
