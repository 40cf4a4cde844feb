"""Work done on the workers: statistics, segmentation and relabelling of one chunk (2D or 3D), matching of two.

Torch and the model are imported and loaded on first use in each worker process (once), never by the
driver, which keeps the process that plans and stitches small.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..preprocess import InputError, check_finite, stretch, to_grayscale
from . import stitch
from .chunks import Box, Chunk, intersect, local, slices
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
    zoom: float | tuple[float, ...] = 1.0  # working size / original size: one factor (planes) or one per axis (volumes)
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


def spatial_ndim(job: Job) -> int:
    """2 for a chunk of a plane, 3 for a chunk of a volume."""
    return len(job.chunk.core) // 2


def plain_gray(pixels: np.ndarray, ndim: int = 2) -> np.ndarray:
    """The plane (``ndim`` 2) or volume (3) the statistics describe: 8/16-bit gray as it is, anything else float32 gray."""
    if pixels.ndim == ndim and is_exact(pixels.dtype):
        return pixels
    if pixels.ndim == ndim:
        check_finite(pixels)
        return pixels.astype(np.float32)
    return to_grayscale(pixels)


def chunk_statistics(job: Job) -> ChunkStats:
    """Histograms (or samples) of one chunk's core, read with one extra index on its second axis (a plane's column,
    a volume's row) for the difference across the border."""
    core = job.chunk.core
    box = (*core[:3], min(core[3] + 1, job.source.spatial_shape[1]), *core[4:])
    return chunk_stats(plain_gray(_pixels(job, box), spatial_ndim(job)), core[0], core[3] - core[2])


def network_input(pixels: np.ndarray, job: Job) -> np.ndarray:
    """Grayscale, inverted against the plane's (volume's) maximum if asked, normalised with its statistics."""
    offset, scale, maximum = job.normalization
    gray = plain_gray(pixels, spatial_ndim(job))
    if job.invert:
        gray = np.float32(maximum) - gray.astype(np.float32)
    return stretch(gray, np.float64(offset), np.float64(scale))


def model_facts(spec: str, diameter: float | None, decode: dict | None, voxel_size: tuple | None = None) -> dict:
    """What the driver needs to plan chunks, computed where the model lives (the driver never imports torch).

    ``ndim`` 2 or 3 (the model's); ``align``: the grid chunks start on (per axis for 3D); ``zoom``:
    working / original size (per axis for 3D); for 3D also ``reach``, the decoder's longest offset
    per axis in working voxels, and ``anisotropy``, the z / x size of the model's training voxels.
    """
    from ..decode.mws import DecodeSettings
    from ..decode.policy import COARSE_FACTORS
    from ..inference import MAX_WORKING_VOXELS, network_geometry, rescale_factor
    from ..segment import check_voxel_size, requested_diameter, volume_scale

    segmenter = cached_segmenter(spec)
    if getattr(segmenter, "kind", "") != "network":
        raise InputError("chunked segmentation needs a network model (teacher, student or a checkpoint)")
    settings = DecodeSettings(**decode) if decode else segmenter.decode_settings
    grid = COARSE_FACTORS[settings.resolution] * settings.long_range_stride
    facts = {"ndim": segmenter.ndim, "invert": segmenter.invert, "decode": settings.to_dict()}
    if segmenter.ndim != 3:
        if voxel_size is not None:
            raise InputError(f"a voxel size applies to volumes segmented by a 3D model; {segmenter.name} segments 2D planes")
        return dict(facts, align=math.lcm(segmenter.model.size_multiple, grid),
                    zoom=rescale_factor(requested_diameter(diameter), segmenter.train_diameter))
    model_voxel = segmenter.voxel_size or (1.0, 1.0, 1.0)
    scale = volume_scale(requested_diameter(diameter), segmenter.train_diameter, check_voxel_size(voxel_size),
                         segmenter.voxel_size)
    reach = [COARSE_FACTORS[settings.resolution] * max(abs(o[a]) for o in segmenter.offsets) for a in range(3)]
    return dict(facts, align=[math.lcm(m, grid) for m in network_geometry(segmenter.model, 3)[1]], zoom=list(scale),
                reach=reach, anisotropy=model_voxel[0] / model_voxel[2], diameter=segmenter.train_diameter,
                max_voxels=MAX_WORKING_VOXELS)


def check_volume_shape(shape: tuple[int, ...]) -> None:
    """InputError unless a 3D network can segment a volume of ``shape`` (run where torch lives)."""
    from ..inference import check_volume

    check_volume(tuple(shape))


def chunk_labels(job: Job, pixels: np.ndarray) -> np.ndarray:
    """Labels (local ids 1..n) of a haloed box, from the network and the decoder (in 3D with the model's offsets)."""
    from ..decode.mws import DecodeSettings
    from ..decode.policy import decode_output
    from ..inference import DEFAULT_TILE, network_output, rescaled

    segmenter = cached_segmenter(job.model)
    settings = DecodeSettings(**job.decode) if job.decode else segmenter.decode_settings
    zoom = tuple(job.zoom) if isinstance(job.zoom, (tuple, list)) else job.zoom
    working = rescaled(network_input(pixels, job), zoom)
    if spatial_ndim(job) == 3:
        output = network_output(segmenter.model, working, tuple(pixels.shape), zoom, job.tile or DEFAULT_TILE,
                                offsets=segmenter.offsets)
        return decode_output(output, settings, output.offsets)[0]
    output = network_output(segmenter.model, working, tuple(pixels.shape[:2]), zoom, job.tile or DEFAULT_TILE)
    return decode_output(output, settings)[0]


def segment_chunk(job: Job) -> int:
    """Segment one chunk with its halo: core labels to the local array, overlaps with neighbours to its record."""
    _threads(job.threads)
    chunk, work = job.chunk, Path(job.work)
    labels = chunk_labels(job, _pixels(job, chunk.outer))
    core = labels[local(chunk.core, chunk.outer)]
    open_local_array(work)[(chunk.plane, *slices(chunk.core))] = core
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
    local_ids = open_local_array(work)[(chunk.plane, *slices(chunk.core))]
    open_labels_array(target)[job.source.index(chunk.plane, chunk.core, drop_channel=True)] = \
        tables[offsets[index] + local_ids].astype(local_ids.dtype)
    (work / "done" / chunk.key).touch()
