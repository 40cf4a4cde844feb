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

Everything works on images (K,H,W) and volumes (K,D,H,W) alike; the offsets (default: those of
:func:`affinity.offsets_for` for the array's dimensionality) say which is which. Neighbourhoods are
the face neighbours (4 in 2D, 6 in 3D) and the 3x3 (3x3x3) boxes.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import mwatershed
import numpy as np
from scipy import ndimage as ndi

from ..affinity import Offsets, _slices, is_short, resolve_offsets

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


def _along(axis: int, ndim: int, index) -> tuple:
    """Index tuple selecting ``index`` on ``axis`` and everything on the other axes."""
    return tuple(index if a == axis else slice(None) for a in range(ndim))


def signed_weights(affinities: np.ndarray, offsets: Offsets | None = None, attractive_bias: float = 0.3) -> np.ndarray:
    """Affinities (K,*spatial) in [-1,1] to mutex-watershed edge weights (float64)."""
    offsets = resolve_offsets(offsets, affinities.ndim - 1)
    weights = np.empty(affinities.shape, dtype=np.float64)
    for k, off in enumerate(offsets):
        weights[k] = affinities[k] - (attractive_bias if is_short(off) else 1.0)
    return weights


def agglomerate(weights: np.ndarray, offsets: Offsets | None = None, stride: int = 4, randomized: bool = False) -> np.ndarray:
    """Mutex watershed (*spatial) uint64 of signed edge weights, long-range edges strided in every axis.

    Offsets longer than the image are skipped (mwatershed cannot take them); a 0 weight is no edge.
    """
    nd = weights.ndim - 1
    offsets = resolve_offsets(offsets, nd)
    fits = [k for k, off in enumerate(offsets) if all(abs(o) < n for o, n in zip(off, weights.shape[1:]))]
    offsets = [list(offsets[k]) for k in fits]
    strides = [[1] * nd if is_short(off) else [stride] * nd for off in offsets]
    return mwatershed.agglom(np.ascontiguousarray(weights[fits]), offsets, strides=strides, randomized_strides=randomized)


def mutex_watershed(
    affinities: np.ndarray, offsets: Offsets | None = None, attractive_bias: float = 0.3, stride: int = 4,
    randomized: bool = False
) -> np.ndarray:
    """Over-complete segmentation (*spatial) uint64 of the whole image (or volume) from affinities."""
    return agglomerate(signed_weights(affinities, offsets, attractive_bias), offsets, stride, randomized)


def dilate_cross(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary dilation by the face-neighbour cross, repeated: ``ndi.binary_dilation``'s default, ~15x faster by array shifts."""
    nd = mask.ndim
    for _ in range(iterations):
        grown = mask.copy()
        for a in range(nd):
            grown[_along(a, nd, slice(1, None))] |= mask[_along(a, nd, slice(None, -1))]
            grown[_along(a, nd, slice(None, -1))] |= mask[_along(a, nd, slice(1, None))]
        mask = grown
    return mask


def support_mask(foreground: np.ndarray) -> np.ndarray:
    """Pixels that enter the graph: within SUPPORT_MARGIN grid px of a foreground probability >= SUPPORT_THRESHOLD."""
    return dilate_cross(foreground >= SUPPORT_THRESHOLD, SUPPORT_MARGIN)


def nearest_channels(offsets: Offsets, ndim: int) -> list[int]:
    """Per axis, the channel of the offset to the previous pixel along it (-1 on that axis, 0 elsewhere)."""
    offsets = [tuple(o) for o in offsets]
    units = [tuple(-1 if a == axis else 0 for a in range(ndim)) for axis in range(ndim)]
    missing = [u for u in units if u not in offsets]
    if missing:
        raise ValueError(f"fragment decoding needs the nearest-neighbour offset {list(missing[0])}")
    return [offsets.index(u) for u in units]


def fragments(affinities: np.ndarray, foreground: np.ndarray, support: np.ndarray, attractive_bias: float,
              foreground_threshold: float, attraction: float = FRAGMENT_ATTRACTION,
              offsets: Offsets | None = None) -> tuple[np.ndarray, int]:
    """Fragment ids (*spatial) 1..n, 0 outside ``support``: support pixels joined where the nearest-neighbour
    weight exceeds ``attraction`` or both pixels are background (foreground below the threshold).

    Strong attraction is what the mutex watershed would merge first anyway, and background pixels
    are discarded by the background rule; pre-merging them leaves ~10x fewer nodes than pixels.
    Connectivity is found by one labelling of a doubled grid (pixels on even cells, edges between).
    """
    nd = support.ndim
    channels = nearest_channels(resolve_offsets(offsets, nd), nd)
    background = support & (foreground < foreground_threshold)
    joined = np.zeros(tuple(2 * n - 1 for n in support.shape), dtype=bool)
    joined[(slice(None, None, 2),) * nd] = support
    for axis, k in enumerate(channels):
        hi, lo = _along(axis, nd, slice(1, None)), _along(axis, nd, slice(None, -1))
        strong = affinities[k][hi] - attractive_bias > attraction
        between = tuple(slice(1, None, 2) if a == axis else slice(None, None, 2) for a in range(nd))
        joined[between] = (strong & support[hi] & support[lo]) | (background[hi] & background[lo])
    labels, n = ndi.label(joined)
    return labels[(slice(None, None, 2),) * nd], n


def fragment_edges(affinities: np.ndarray, fragment_ids: np.ndarray, attractive_bias: float, stride: int,
                   randomized: bool = False, offsets: Offsets | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """End fragments (u, v) and signed weights of every pixel edge joining two different fragments.

    Nearest-neighbour edges weigh ``aff - attractive_bias``; long-range edges ``aff - 1`` and are
    taken on a grid of step ``stride`` in every axis, or at random with probability 1/stride^ndim
    (seeded), as :func:`agglomerate` does.
    """
    shape = fragment_ids.shape
    rng = np.random.default_rng(0)
    us, vs, weights = [], [], []
    for k, offset in enumerate(resolve_offsets(offsets, fragment_ids.ndim)):
        short = is_short(offset)
        step = 1 if short or randomized else stride
        here, there = (tuple(slice(s.start, s.stop, step) for s in part) for part in _slices(offset, shape))
        a, b = fragment_ids[here], fragment_ids[there]
        edge = (a != b) & (a > 0) & (b > 0)
        if randomized and not short:
            edge &= rng.random(edge.shape) < 1.0 / stride**fragment_ids.ndim
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
                             attraction: float = FRAGMENT_ATTRACTION, offsets: Offsets | None = None) -> np.ndarray:
    """Mutex watershed of the fragment graph near the foreground (*spatial) int64; pixels outside it are 0.

    Only pixels near the foreground enter the graph (:func:`support_mask`), pre-merged into
    :func:`fragments`; each pair of fragments keeps its strongest pixel edge and mwatershed's
    ``cluster`` runs the greedy mutex rule on that small graph. Support regions that do not touch
    share no attractive edge, so they are never merged. 2-4x faster than pixel-level agglomeration
    and no worse on the tune split (benchmarks/results/decoder_fragments.md).
    """
    fragment_ids, n = fragments(affinities, foreground, support_mask(foreground), attractive_bias,
                                foreground_threshold, attraction, offsets)
    edges = strongest_edges(*fragment_edges(affinities, fragment_ids, attractive_bias, stride, randomized, offsets))
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
    behind ``expand_labels`` breaks ties in (squared distance, then the last axis, ..., then the
    first: column then row in 2D), which replaces a whole-image distance transform (~3 ms at 260x348).
    """
    counts = np.bincount(labels.ravel())
    small = counts < min_size
    small[0] = False
    if not small.any():
        return labels
    fragment = small[labels]
    kept = np.where(fragment, 0, labels)
    coords = np.nonzero(fragment)
    reach = max(int(distance), 0)
    deltas = [d.ravel() for d in np.mgrid[(slice(-reach, reach + 1),) * labels.ndim]]
    squared = sum(d * d for d in deltas)
    order = np.lexsort((*deltas, squared))  # by squared distance, then the last axis, ..., then the first
    padded = np.pad(kept, reach)
    owner = np.zeros(coords[0].size, dtype=kept.dtype)
    for k in order[(squared[order] > 0) & (np.sqrt(squared[order]) <= distance)]:
        owner = np.where(owner > 0, owner, padded[tuple(c + reach + d[k] for c, d in zip(coords, deltas))])
    kept[coords] = owner
    return kept


def filter_3x3(labels: np.ndarray, op: np.ufunc) -> np.ndarray:
    """``op`` (np.maximum/minimum) over each 3x3 (3x3x3) neighbourhood, edges clipped: scipy's size-3 filter, ~3x faster."""
    out = np.pad(labels, 1, mode="edge")
    for a in range(labels.ndim):
        out = op(op(out[_along(a, out.ndim, slice(None, -2))], out[_along(a, out.ndim, slice(1, -1))]),
                 out[_along(a, out.ndim, slice(2, None))])
    return out


def border_values(labels: np.ndarray) -> np.ndarray:
    """Values on the image's (volume's) border: its first and last row/column (slice) along every axis."""
    return np.concatenate([np.take(labels, i, axis=a).ravel() for a in range(labels.ndim) for i in (0, -1)])


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill background holes enclosed by objects (nuclei have none): each hole takes a rim object's id.

    A hole is a face-connected background component that does not touch the image border (the
    definition ``ndi.binary_fill_holes`` uses), found with one labelling pass.
    """
    background, n = ndi.label(labels == 0)
    enclosed = np.ones(n + 1, dtype=bool)
    enclosed[border_values(background)] = False
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


def decode(affinities: np.ndarray, foreground: np.ndarray | None, settings: DecodeSettings = DecodeSettings(),
           offsets: Offsets | None = None) -> np.ndarray:
    """Instance labels (*spatial) int32, 0 = background, from affinities (K,*spatial) and foreground probability.

    Background rule: a segment is background when its mean foreground probability is below the
    threshold (a learned head, so it holds beyond BBBC039). Without a foreground head, the segment
    covering most image border pixels is taken as background (one connected background).
    Sizes in ``settings`` count pixels (voxels in 3D).
    """
    mws_args = (settings.attractive_bias, settings.long_range_stride, settings.randomized_strides)
    if foreground is not None:
        segments = fragment_mutex_watershed(affinities, foreground, *mws_args, settings.foreground_threshold,
                                            offsets=offsets)
        labels = remove_background(segments, foreground, settings.foreground_threshold)
    else:
        labels = remove_border_background(mutex_watershed(affinities, offsets, *mws_args))
    labels = merge_fragments(labels, settings.min_size, settings.merge_distance)
    labels = fill_holes(labels)
    return relabel(labels).astype(np.int32)


def refine_upsampled(coarse: np.ndarray, foreground: np.ndarray | None, shape: tuple[int, ...],
                     settings: DecodeSettings, factor: int = 2) -> np.ndarray:
    """Labels decoded on a ``factor`` times coarser grid, brought to ``shape`` with full-resolution outlines.

    Coarse pixel (i, j) covers input pixels [i*factor, (i+1)*factor) x [j*factor, (j+1)*factor)
    (the average-pooling grid), so upsampling repeats it. That puts outlines on the coarse grid:
    within ``factor`` px of any outline the full-resolution foreground probability decides: a pixel
    is background below the threshold, else it belongs to its own object or, if it was background,
    to the neighbouring object. Interiors keep their coarse label, so no holes appear.
    """
    def upsample(coarse_map: np.ndarray) -> np.ndarray:
        for a in range(coarse_map.ndim):
            coarse_map = np.repeat(coarse_map, factor, axis=a)
        return coarse_map[tuple(slice(0, n) for n in shape)]

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
    background = np.bincount(border_values(seg)).argmax()
    return np.where(seg == background, 0, seg)
