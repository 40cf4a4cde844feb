"""Mutex-watershed decoding of affinities into instance labels, with background and fragment rules.

Sign convention (docs/method.md, "Decoder"): ``mwatershed.agglom`` wants signed weights, positive = attract,
negative = repel, processed in order of decreasing magnitude. Our affinities are cosines in
[-1, 1] with target 1 (same object) / 0 (different objects). Nearest-neighbour channels become
``aff - attractive_bias`` (attractive where the pixels agree) and long-range channels become
``aff - 1`` (never attractive, repelling with strength ``1 - aff``). Long-range edges are
subsampled on a stride grid: faster, and less split-prone on noisy embeddings.

With a foreground head the greedy rule runs on a graph of fragments near the foreground
(:func:`fragment_mutex_watershed`, via ``mwatershed.cluster``); without one, on the whole pixel grid
(:func:`mutex_watershed`, via ``mwatershed.agglom``).
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import mwatershed
import numpy as np
from scipy import ndimage as ndi

from ..affinity import OFFSETS, _slices

SUPPORT_THRESHOLD = 0.1  # foreground probability above which a pixel may belong to an object ...
SUPPORT_MARGIN = 2  # ... and grid pixels around such pixels that still enter the graph (benchmarks/results/decoder_support.md)
FRAGMENT_ATTRACTION = 0.95  # nearest-neighbour weight above which pixels are pre-merged (benchmarks/results/decoder_fragments.md)


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


def dilate_cross(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary dilation by the 4-neighbour cross, repeated: ``ndi.binary_dilation``'s default, ~15x faster by array shifts."""
    for _ in range(iterations):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def support_mask(foreground: np.ndarray) -> np.ndarray:
    """Pixels that enter the graph: within SUPPORT_MARGIN grid px of a foreground probability >= SUPPORT_THRESHOLD."""
    return dilate_cross(foreground >= SUPPORT_THRESHOLD, SUPPORT_MARGIN)


def fragments(affinities: np.ndarray, foreground: np.ndarray, support: np.ndarray, attractive_bias: float,
              foreground_threshold: float, attraction: float = FRAGMENT_ATTRACTION) -> tuple[np.ndarray, int]:
    """Fragment ids (H,W) 1..n, 0 outside ``support``: support pixels joined where the nearest-neighbour
    weight exceeds ``attraction`` or both pixels are background (foreground below the threshold).

    Strong attraction is what the mutex watershed would merge first anyway, and background pixels
    are discarded by the background rule; pre-merging them leaves ~10x fewer nodes than pixels.
    Connectivity is found by one labelling of a doubled grid (pixels on even cells, edges between).
    """
    h, w = support.shape
    background = support & (foreground < foreground_threshold)
    joined = np.zeros((2 * h - 1, 2 * w - 1), dtype=bool)
    joined[::2, ::2] = support
    strong = affinities[:2] - attractive_bias > attraction  # channels 0, 1: offsets (-1, 0), (0, -1)
    joined[1::2, ::2] = (strong[0, 1:] & support[1:] & support[:-1]) | (background[1:] & background[:-1])
    joined[::2, 1::2] = (strong[1, :, 1:] & support[:, 1:] & support[:, :-1]) | (background[:, 1:] & background[:, :-1])
    labels, n = ndi.label(joined)
    return labels[::2, ::2], n


def fragment_edges(affinities: np.ndarray, fragment_ids: np.ndarray, attractive_bias: float, stride: int,
                   randomized: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """End fragments (u, v) and signed weights of every pixel edge joining two different fragments.

    Nearest-neighbour edges weigh ``aff - attractive_bias``; long-range edges ``aff - 1`` and are
    taken on a ``stride`` x ``stride`` grid, or at random with probability 1/stride^2 (seeded), as
    :func:`agglomerate` does.
    """
    h, w = fragment_ids.shape
    rng = np.random.default_rng(0)
    us, vs, weights = [], [], []
    for k, offset in enumerate(OFFSETS):
        short = max(abs(o) for o in offset) == 1
        step = 1 if short or randomized else stride
        here, there = (tuple(slice(s.start, s.stop, step) for s in part) for part in _slices(offset, (h, w)))
        a, b = fragment_ids[here], fragment_ids[there]
        edge = (a != b) & (a > 0) & (b > 0)
        if randomized and not short:
            edge &= rng.random(edge.shape) < 1.0 / stride**2
        us.append(a[edge])
        vs.append(b[edge])
        weights.append(affinities[k][here][edge] - (attractive_bias if short else 1.0))
    return np.concatenate(us), np.concatenate(vs), np.concatenate(weights).astype(np.float64)


def strongest_edges(u: np.ndarray, v: np.ndarray, weights: np.ndarray) -> list[tuple[bool, int, int]]:
    """Per node pair its edge of largest magnitude, as (attractive, u, v) in decreasing magnitude.

    The mutex watershed processes edges by decreasing magnitude and, after the first edge between
    two nodes, every later one is a no-op (they are merged, or mutually exclusive), so this is exact.
    """
    lo, hi = np.minimum(u, v).astype(np.int64), np.maximum(u, v).astype(np.int64)
    pair = lo * (int(hi.max(initial=0)) + 1) + hi
    order = np.argsort(pair)
    pair, magnitude = pair[order], np.abs(weights[order])
    first = np.ones(len(pair), dtype=bool)
    first[1:] = pair[1:] != pair[:-1]
    starts = np.flatnonzero(first)
    group = np.cumsum(first) - 1
    strongest = magnitude == np.maximum.reduceat(magnitude, starts)[group] if len(pair) else first
    candidates = np.flatnonzero(strongest)
    chosen = order[candidates[np.r_[True, group[candidates[1:]] != group[candidates[:-1]]]]] if len(candidates) else candidates
    magnitude = np.abs(weights[chosen])
    chosen = chosen[np.argsort(-np.where(weights[chosen] > 0, magnitude, np.nextafter(magnitude, np.inf)))]
    return list(zip((weights[chosen] > 0).tolist(), lo[chosen].tolist(), hi[chosen].tolist()))


def fragment_mutex_watershed(affinities: np.ndarray, foreground: np.ndarray, attractive_bias: float = 0.3,
                             stride: int = 4, randomized: bool = False, foreground_threshold: float = 0.5,
                             attraction: float = FRAGMENT_ATTRACTION) -> np.ndarray:
    """Mutex watershed of the fragment graph near the foreground (H,W) int64; pixels outside it are 0.

    Only pixels near the foreground enter the graph (:func:`support_mask`), pre-merged into
    :func:`fragments`; each pair of fragments keeps its strongest pixel edge and mwatershed's
    ``cluster`` runs the greedy mutex rule on that small graph. Support regions that do not touch
    share no attractive edge, so they are never merged. 2-4x faster than pixel-level agglomeration
    and no worse on the tune split (benchmarks/results/decoder_fragments.md).
    """
    fragment_ids, n = fragments(affinities, foreground, support_mask(foreground), attractive_bias,
                                foreground_threshold, attraction)
    edges = strongest_edges(*fragment_edges(affinities, fragment_ids, attractive_bias, stride, randomized))
    segment_of = np.arange(n + 1, dtype=np.int64)
    if edges:
        clustered = mwatershed.cluster(edges)  # (fragment, segment) pairs
        pairs = np.fromiter(itertools.chain.from_iterable(clustered), dtype=np.int64, count=2 * len(clustered))
        segment_of[pairs[0::2]] = pairs[1::2]
    # mwatershed picks a cluster's representative in no fixed order; name each segment after its
    # first fragment (raster order) so labels, and the clean-up ties that depend on ids, are reproducible
    representatives, first = np.unique(segment_of, return_index=True)
    first_fragment = np.zeros(n + 1, dtype=np.int64)
    first_fragment[representatives] = first
    return first_fragment[segment_of][fragment_ids]


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
    """Hand segments smaller than ``min_size`` to the nearest kept object within ``distance`` px, else drop.

    Equals ``np.where(fragment, expand_labels(kept, distance), kept)`` (skimage) exactly, but looks
    only at fragment pixels: each takes the first kept pixel in the order the distance transform
    behind ``expand_labels`` breaks ties in (squared distance, then column, then row), which
    replaces a whole-image distance transform (~3 ms at 260x348).
    """
    counts = np.bincount(labels.ravel())
    small = counts < min_size
    small[0] = False
    if not small.any():
        return labels
    fragment = small[labels]
    kept = np.where(fragment, 0, labels)
    rows, cols = np.nonzero(fragment)
    reach = max(int(distance), 0)
    dy, dx = (d.ravel() for d in np.mgrid[-reach : reach + 1, -reach : reach + 1])
    squared = dy * dy + dx * dx
    order = np.lexsort((dy, dx, squared))  # by squared distance, then column, then row
    padded = np.pad(kept, reach)
    owner = np.zeros(rows.size, dtype=kept.dtype)
    for k in order[(squared[order] > 0) & (np.sqrt(squared[order]) <= distance)]:
        owner = np.where(owner > 0, owner, padded[rows + reach + dy[k], cols + reach + dx[k]])
    kept[rows, cols] = owner
    return kept


def filter_3x3(labels: np.ndarray, op: np.ufunc) -> np.ndarray:
    """``op`` (np.maximum/minimum) over each 3x3 neighbourhood, edges clipped: scipy's size-3 filter, ~3x faster."""
    padded = np.pad(labels, 1, mode="edge")
    rows = op(op(padded[:-2], padded[1:-1]), padded[2:])
    return op(op(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


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
    rim_hole = filter_3x3(hole_ids, np.maximum)
    rim = (rim_hole > 0) & (labels > 0)
    owner = np.zeros(n + 1, dtype=labels.dtype)
    owner[rim_hole[rim]] = labels[rim]
    return np.where(hole_ids > 0, owner[hole_ids], labels)


def relabel(labels: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Ids with ``keep[id]`` (default: every id present) renumbered 1..N in id order, others 0, dtype kept:
    a lookup table, ~5x skimage's speed."""
    keep = np.bincount(labels.ravel()) > 0 if keep is None else keep
    table = np.zeros(len(keep), dtype=labels.dtype)
    table[1:][keep[1:]] = np.arange(1, np.count_nonzero(keep[1:]) + 1)
    return np.take(table, labels)


def drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Remove objects smaller than ``min_size`` px and relabel 1..N (unchanged input when nothing to do)."""
    keep = np.bincount(labels.ravel()) >= max(min_size, 1)
    return labels if keep[1:].all() else relabel(labels, keep)


def decode(affinities: np.ndarray, foreground: np.ndarray | None, settings: DecodeSettings = DecodeSettings()) -> np.ndarray:
    """Instance labels (H,W) int32, 0 = background, from affinities (K,H,W) and foreground probability.

    Background rule: a segment is background when its mean foreground probability is below the
    threshold (a learned head, so it holds beyond BBBC039). Without a foreground head, the segment
    covering most image border pixels is taken as background (one connected background).
    """
    mws_args = (settings.attractive_bias, settings.long_range_stride, settings.randomized_strides)
    if foreground is not None:
        segments = fragment_mutex_watershed(affinities, foreground, *mws_args, settings.foreground_threshold)
        labels = remove_background(segments, foreground, settings.foreground_threshold)
    else:
        labels = remove_border_background(mutex_watershed(affinities, OFFSETS, *mws_args))
    labels = merge_fragments(labels, settings.min_size, settings.merge_distance)
    labels = fill_holes(labels)
    return relabel(labels).astype(np.int32)


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

    coarse = coarse.astype(np.int32, copy=False)
    if foreground is None:
        return upsample(coarse)
    # A full-resolution window of +-factor px always spans exactly the 3x3 coarse neighbourhood of
    # its pixel's cell, so 3x3 filters on the coarse grid give the full-resolution band exactly.
    high, low = filter_3x3(coarse, np.maximum), filter_3x3(coarse, np.minimum)
    grown = np.where(coarse > 0, coarse, high)  # off the band high == coarse, so this is coarse there
    labels = upsample(grown) * (~upsample(high != low) | (foreground >= settings.foreground_threshold))
    return drop_small(labels, settings.min_size)


def remove_border_background(segments: np.ndarray) -> np.ndarray:
    """Background = the segment owning most border pixels (for networks without a foreground head)."""
    seg = relabel(segments.astype(np.int64))
    border = np.concatenate([seg[0], seg[-1], seg[:, 0], seg[:, -1]])
    background = np.bincount(border).argmax()
    return np.where(seg == background, 0, seg)
