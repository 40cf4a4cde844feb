"""Whole-plane (whole-volume) normalisation statistics gathered chunk by chunk, so every chunk is normalised like the whole.

8/16-bit grayscale planes and volumes give exactly :func:`~napari_graphkd.preprocess.normalize`'s numbers
(value and neighbour-difference histograms add up over chunks); other inputs (float, RGB) use a
fixed-size random sample of every chunk, an estimate of the same percentiles.

:func:`~napari_graphkd.preprocess.noise_sigma` takes every 4th index of the first axis and the
differences along the second: rows and columns of a plane, planes and rows of a volume. Chunk
statistics follow the same axes, so one function serves both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..preprocess import MIN_CONTRAST_SNR, PERCENTILES, histogram_percentiles, median, stretch_range

SAMPLE_PER_CHUNK = 16384  # values (and differences) sampled per chunk from float or colour inputs
NOISE_ROW_STEP = 4  # noise_sigma reads every 4th row


@dataclass
class ChunkStats:
    """Value and horizontal-difference statistics of one chunk: histograms (integers) or samples (floats)."""

    values: np.ndarray
    diffs: np.ndarray
    exact: bool
    maximum: float  # largest value (the reference of ``invert``)


def is_exact(dtype: np.dtype) -> bool:
    """Whether chunks of this gray dtype give exact histograms (unsigned 8/16-bit)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "u" and dtype.itemsize <= 2


def chunk_stats(gray: np.ndarray, y0: int, core_width: int, seed: int = 0) -> ChunkStats:
    """Statistics of a chunk's core ``gray[:, :core_width]`` (first axis starting at global index ``y0``).

    ``gray`` is a plane (rows, columns) or a volume (planes, rows, columns); it may carry one extra
    index on the second axis (a column; a volume's row) so the difference across the chunk border is counted once.
    """
    rows = gray[(-y0) % NOISE_ROW_STEP :: NOISE_ROW_STEP]  # global rows 0, 4, 8, ...
    core = gray[:, :core_width]
    if is_exact(gray.dtype):
        diffs = np.diff(rows.astype(np.int32), axis=1).ravel() + 65535
        return ChunkStats(np.bincount(core.ravel(), minlength=65536), np.bincount(diffs, minlength=2 * 65535 + 1), True,
                          float(core.max()))
    rng = np.random.default_rng(seed)
    values, diffs = core.ravel().astype(np.float32), np.diff(rows.astype(np.float32), axis=1).ravel()
    pick = lambda a: a if a.size <= SAMPLE_PER_CHUNK else a[rng.choice(a.size, SAMPLE_PER_CHUNK, replace=False)]
    return ChunkStats(pick(values), pick(diffs), False, float(values.max()))


def combine(parts: list[ChunkStats]) -> ChunkStats:
    """Statistics of a plane from those of its chunks."""
    maximum = max(p.maximum for p in parts)
    if all(p.exact for p in parts):
        return ChunkStats(np.sum([p.values for p in parts], axis=0), np.sum([p.diffs for p in parts], axis=0), True, maximum)
    return ChunkStats(np.concatenate([p.values for p in parts]), np.concatenate([p.diffs for p in parts]), False, maximum)


def histogram_median(values: np.ndarray, counts: np.ndarray) -> np.float32:
    """Median (float32, :func:`~napari_graphkd.preprocess.median`'s rule) of ``values`` repeated ``counts`` times."""
    order = np.argsort(values, kind="stable")
    values, cumulative = values[order].astype(np.float32), np.cumsum(counts[order])
    n = int(cumulative[-1])
    upper = values[np.searchsorted(cumulative, n // 2, side="right")]
    if n % 2:
        return upper
    return (values[np.searchsorted(cumulative, n // 2 - 1, side="right")] + upper) / np.float32(2)


def noise_from_diffs(stats: ChunkStats) -> float:
    """``noise_sigma`` from the plane's horizontal differences."""
    if stats.exact:
        present = np.flatnonzero(stats.diffs)
        if present.size == 0:
            return 0.0
        diffs, counts = (present - 65535).astype(np.float32), stats.diffs[present]
        centre = histogram_median(diffs, counts)
        mad = histogram_median(np.abs(diffs - centre), counts)
    else:
        if stats.diffs.size == 0:
            return 0.0
        mad = median(np.abs(stats.diffs - median(stats.diffs)))
    return float(1.4826 * mad / np.sqrt(2.0))


def plane_normalization(stats: ChunkStats, invert: bool = False, min_contrast_snr: float = MIN_CONTRAST_SNR) -> tuple[float, float]:
    """(offset, scale) of the plane's normalisation; ``invert`` for a plane read as ``maximum - value``."""
    if stats.exact:
        counts = np.trim_zeros(stats.values, "b")
        lo, hi = histogram_percentiles(counts[::-1] if invert else counts, PERCENTILES)
    else:
        lo, hi = np.percentile(np.float32(stats.maximum) - stats.values if invert else stats.values, PERCENTILES)
    noise = noise_from_diffs(stats) if min_contrast_snr > 0 else 0.0
    offset, scale = stretch_range(lo, hi, noise, min_contrast_snr)
    return float(offset), float(scale)
