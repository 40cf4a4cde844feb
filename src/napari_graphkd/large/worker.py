"""Work done on the workers: statistics, segmentation and relabelling of one chunk, matching of two.

Torch and the model are imported and loaded on first use in each worker process (once), never by the
driver, which keeps the process that plans and stitches small.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..preprocess import InputError, stretch, to_grayscale
from . import stitch
from .chunks import Box, Chunk, intersect, local
from .stats import ChunkStats, chunk_stats, is_exact
from .zarr_io import LabelsTarget, Source, atomic_savez, open_labels_array, open_local_array


@dataclass(frozen=True)
class Job:
    """Everything a worker needs for one chunk (pickled to worker processes)."""

    source: Source
    chunk: Chunk
    work: str
    model: str = ""
    neighbours: tuple[tuple[str, Box], ...] = ()
    normalization: tuple[float, float, float] = (0.0, 1.0, 0.0)  # offset, scale, maximum (for invert)
    invert: bool = False
    zoom: float = 1.0
    tile: int | None = None  # network tile size (None: the library's default)
    threads: int = 0  # torch threads per worker (0: leave as is)
    decode: dict | None = None  # DecodeSettings fields (None: the model's own)
    region: np.ndarray | None = None  # pixels of the box read, for in-memory inputs


@functools.lru_cache(maxsize=2)
def cached_segmenter(spec: str):
    """The model, loaded once per process and reused for every chunk."""
    from ..segment import load_segmenter

    return load_segmenter(spec)


def _threads(n: int) -> None:
    """Limit torch's threads in this worker (once)."""
    import torch

    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _pixels(job: Job, box: Box) -> np.ndarray:
    """Pixels of ``box`` from the job's in-memory region or from the source."""
    return job.region if job.region is not None else job.source.read(job.chunk.plane, box)


def plain_gray(pixels: np.ndarray) -> np.ndarray:
    """The 2D plane the statistics describe: 8/16-bit gray as it is, anything else float32 gray."""
    if pixels.ndim == 2 and is_exact(pixels.dtype):
        return pixels
    return to_grayscale(pixels)


def chunk_statistics(job: Job) -> ChunkStats:
    """Histograms (or samples) of one chunk's core, read with one extra column for the border difference."""
    y0, y1, x0, x1 = job.chunk.core
    box = (y0, y1, x0, min(x1 + 1, job.source.plane_shape[1]))
    return chunk_stats(plain_gray(_pixels(job, box)), y0, x1 - x0)


def network_input(pixels: np.ndarray, job: Job) -> np.ndarray:
    """Grayscale, inverted against the plane's maximum if asked, normalised with the plane's statistics."""
    offset, scale, maximum = job.normalization
    gray = plain_gray(pixels)
    if job.invert:
        gray = np.float32(maximum) - gray.astype(np.float32)
    return stretch(gray, np.float64(offset), np.float64(scale))


def model_facts(spec: str, diameter: float | None, decode: dict | None) -> dict:
    """What the driver needs to plan chunks, computed where the model lives (the driver never imports torch)."""
    from ..decode.mws import DecodeSettings
    from ..decode.policy import COARSE_FACTORS
    from ..inference import rescale_factor
    from ..segment import requested_diameter

    segmenter = cached_segmenter(spec)
    if getattr(segmenter, "kind", "") != "network":
        raise InputError("chunked segmentation needs a network model (teacher, student or a checkpoint)")
    settings = DecodeSettings(**decode) if decode else segmenter.decode_settings
    align = math.lcm(segmenter.model.size_multiple, COARSE_FACTORS[settings.resolution] * settings.long_range_stride)
    return {"align": align, "zoom": rescale_factor(requested_diameter(diameter), segmenter.train_diameter), "invert": segmenter.invert,
            "decode": settings.to_dict()}


def chunk_labels(job: Job, pixels: np.ndarray) -> np.ndarray:
    """Labels (local ids 1..n) of a haloed box, from the network and the decoder."""
    from ..decode.mws import DecodeSettings
    from ..decode.policy import decode_output
    from ..inference import DEFAULT_TILE, network_output, rescaled

    segmenter = cached_segmenter(job.model)
    working = rescaled(network_input(pixels, job), job.zoom)
    output = network_output(segmenter.model, working, tuple(pixels.shape[:2]), job.zoom, job.tile or DEFAULT_TILE)
    labels, _ = decode_output(output, DecodeSettings(**job.decode) if job.decode else segmenter.decode_settings)
    return labels


def segment_chunk(job: Job) -> int:
    """Segment one chunk with its halo: core labels to the local array, overlaps with neighbours to its record."""
    _threads(job.threads)
    chunk, work = job.chunk, Path(job.work)
    labels = chunk_labels(job, _pixels(job, chunk.outer))
    core = labels[local(chunk.core, chunk.outer)]
    open_local_array(work)[chunk.plane, chunk.core[0] : chunk.core[1], chunk.core[2] : chunk.core[3]] = core
    overlaps = {f"n_{key}": labels[local(intersect(chunk.outer, outer), chunk.outer)] for key, outer in job.neighbours}
    present = np.flatnonzero(np.bincount(core.ravel()))
    atomic_savez(work / "chunks" / f"{chunk.key}.npz", count=np.int64(labels.max(initial=0)),
                 present=present[present > 0], **overlaps)
    return int(present[present > 0].size)


def match_pair(work: str, a: Chunk, b: Chunk) -> np.ndarray:
    """Matched (id in a, id in b) pairs where the haloed boxes of two neighbouring chunks overlap, inside either core."""
    box = intersect(a.outer, b.outer)
    with np.load(Path(work) / "chunks" / f"{a.key}.npz") as fa, np.load(Path(work) / "chunks" / f"{b.key}.npz") as fb:
        la, lb, present_a, present_b = fa[f"n_{b.key}"], fb[f"n_{a.key}"], fa["present"], fb["present"]
    region = np.zeros(la.shape, dtype=bool)
    for core in (a.core, b.core):
        inside = intersect(box, core)
        if inside is not None:
            region[local(inside, box)] = True
    pairs = stitch.matching_pairs(la, lb, region)
    # only objects each chunk keeps (present in its core): an object seen only in a chunk's halo is
    # owned by another chunk, and matching through it could chain two nuclei that halo view merged
    return pairs[np.isin(pairs[:, 0], present_a) & np.isin(pairs[:, 1], present_b)]


@functools.lru_cache(maxsize=1)
def _tables(path: str, mtime: float) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated id tables and their offsets, loaded once per process and run."""
    with np.load(path) as f:
        return f["tables"], f["offsets"]


def relabel_chunk(job: Job, index: int, target: LabelsTarget) -> None:
    """Write one core chunk of the output with global ids and record it."""
    chunk, work = job.chunk, Path(job.work)
    ids = work / "ids.npz"
    tables, offsets = _tables(str(ids), ids.stat().st_mtime)
    y0, y1, x0, x1 = chunk.core
    local_ids = open_local_array(work)[chunk.plane, y0:y1, x0:x1]
    open_labels_array(target)[job.source.index(chunk.plane, chunk.core, drop_channel=True)] = \
        tables[offsets[index] + local_ids].astype(local_ids.dtype)
    (work / "done" / chunk.key).touch()
