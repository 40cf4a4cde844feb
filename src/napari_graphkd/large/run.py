"""Chunked segmentation of images larger than memory, on threads or a ``dask.distributed`` cluster.

Four stages, each a set of independent tasks (one per chunk, or per pair of neighbouring chunks):

1. ``statistics``: value and noise histograms of every chunk, combined into each plane's normalisation,
   so chunks are normalised exactly as the whole plane would be;
2. ``segment``: network and decoder on each chunk plus a halo; the core's labels (local ids) go to a
   Zarr array, the labels where the haloed box overlaps each neighbour's to a record file;
3. ``stitch``: objects of neighbouring chunks matched by overlap there and merged (:mod:`.stitch`);
4. ``relabel``: every core chunk's local ids replaced by global ids in the output Zarr array.

Finished chunks leave a record in the run's work folder (``<output>.partial``), so a re-run skips them;
the folder is removed when the labels are complete. Workers load the model once per process.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..decode.mws import DecodeSettings
from ..inference import COARSE_FACTORS, DEFAULT_TILE, NetworkOutput, decode_output, rescale_factor, tiled_network
from ..preprocess import InputError, stretch, to_grayscale
from . import stitch
from .chunks import DEFAULT_CHUNK, Box, Chunk, ChunkPlan, intersect, local, round_up
from .stats import ChunkStats, chunk_stats, combine, is_exact, plane_normalization
from .zarr_io import (LabelsTarget, Source, atomic_savez, atomic_write_json, create_labels_array, create_local_array,
                      finish_target, open_labels_array, open_local_array, remove_target)

# Context around each chunk, in px at the training scale: the largest nuclei (~80 px) plus the reach of the
# network (32 px, as its seamless tiling keeps) and of the decoder's longest affinity (27 grid px at half resolution).
HALO = 128


class ChunkError(RuntimeError):
    """A chunk failed; the message names it in one line (finished chunks stay recorded)."""


@dataclass(frozen=True)
class Progress:
    """Where a run stands: stage (statistics, segment, stitch, relabel, done, stopped), tasks done of total."""

    stage: str
    done: int
    total: int
    message: str = ""


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
    tile: int = DEFAULT_TILE
    threads: int = 1
    decode: DecodeSettings | None = None
    region: np.ndarray | None = None  # pixels of the box read, for in-memory inputs


# ----------------------------------------------------------------------------------------------- workers


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


def chunk_labels(job: Job, pixels: np.ndarray) -> np.ndarray:
    """Labels (local ids 1..n) of a haloed box, from the network and the decoder."""
    from scipy import ndimage as ndi

    segmenter = cached_segmenter(job.model)
    start = time.perf_counter()
    prepared = network_input(pixels, job)
    if job.zoom != 1.0:
        prepared = ndi.zoom(prepared, job.zoom, order=1)
    emb, fg = tiled_network(segmenter.model, prepared, tile=job.tile)
    output = NetworkOutput(emb, fg, tuple(pixels.shape[:2]), job.zoom, time.perf_counter() - start,
                           stride=segmenter.model.config.stem_stride, working_shape=prepared.shape)
    labels, _ = decode_output(output, job.decode or segmenter.decode_settings)
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
        la, lb = fa[f"n_{b.key}"], fb[f"n_{a.key}"]
    region = np.zeros(la.shape, dtype=bool)
    for core in (a.core, b.core):
        inside = intersect(box, core)
        if inside is not None:
            region[local(inside, box)] = True
    return stitch.matching_pairs(la, lb, region)


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


# ----------------------------------------------------------------------------------------------- executors


class ThreadExecutor:
    """Tasks on threads of this process (tests, napari, single machine without a cluster)."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self.pool = concurrent.futures.ThreadPoolExecutor(self.workers)
        self.remote = False

    def submit(self, fn: Callable, *args) -> Any:
        """Start ``fn(*args)``."""
        return self.pool.submit(fn, *args)

    def wait_any(self, futures: Iterable) -> set:
        """Finished futures, waiting for at least one."""
        done, _ = concurrent.futures.wait(list(futures), return_when=concurrent.futures.FIRST_COMPLETED)
        return done

    def close(self) -> None:
        """Stop the threads (pending tasks are cancelled)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """Tasks on a ``dask.distributed`` cluster (local processes or a scheduler address)."""

    def __init__(self, client):
        self.client = client
        self.workers = max(1, len(client.scheduler_info().get("workers", {})))
        self.remote = True

    def submit(self, fn: Callable, *args) -> Any:
        """Start ``fn(*args)`` on a worker."""
        return self.client.submit(fn, *args, pure=False)

    def wait_any(self, futures: Iterable) -> set:
        """Finished futures, waiting for at least one."""
        from distributed import wait

        return set(wait(list(futures), return_when="FIRST_COMPLETED").done)

    def close(self) -> None:
        """Nothing to release: the client belongs to the caller."""


def run_tasks(executor, jobs: list, fn: Callable, describe: Callable[[Any], str],
              should_stop: Callable[[], bool] | None) -> Iterator[tuple[Any, Any]]:
    """Yield (job, result) as tasks finish, keeping about two per worker in flight (bounded memory).

    A failing task cancels the rest and raises :class:`ChunkError` naming the job; ``should_stop``
    returning True cancels the rest and ends the iteration (finished work stays recorded).
    """
    pending = iter(jobs)
    running: dict = {}
    window = 2 * executor.workers
    try:
        while True:
            while len(running) < window and not (should_stop and should_stop()):
                job = next(pending, None)
                if job is None:
                    break
                running[executor.submit(fn, *job)] = job
            if not running:
                return
            for future in executor.wait_any(running):
                job = running.pop(future)
                try:
                    result = future.result()
                except Exception as exc:
                    raise ChunkError(f"{describe(job)} failed: {type(exc).__name__}: {exc}") from exc
                yield job, result
    finally:
        for future in running:
            future.cancel()


# ----------------------------------------------------------------------------------------------- driver


def chunk_geometry(segmenter, chunk: int, halo: int | None, zoom: float, decode: DecodeSettings) -> tuple[int, int]:
    """Chunk and halo rounded so every haloed box starts on the grids of the network and the decoder."""
    factor = COARSE_FACTORS[decode.resolution]
    align = math.lcm(segmenter.model.size_multiple, factor * decode.long_range_stride)
    halo = HALO / min(zoom, 1.0) if halo is None else halo
    return round_up(max(chunk, align), align), round_up(halo, align)


def run_settings(source: Source, model: str, plan: ChunkPlan, zoom: float, invert: bool, tile: int,
                 decode: DecodeSettings) -> dict:
    """What a resumed run must share with the unfinished one."""
    return {"input": source.path or "<array>", "shape": list(source.shape), "axes": source.axes, "model": model,
            "chunk": plan.chunk, "halo": plan.halo, "zoom": zoom, "invert": invert, "tile": tile,
            "decode": decode.to_dict()}


def prepare_work(target: LabelsTarget, settings: dict, overwrite: bool) -> dict:
    """The run record: a new work folder, or the unfinished run's when its settings match."""
    record_path = target.work / "run.json"
    if overwrite:
        remove_target(target)
    if Path(target.path).exists() and not target.work.exists():
        raise FileExistsError(f"{target.path} exists; pass --overwrite (overwrite=True) or choose another output")
    if record_path.exists():
        import json

        record = json.loads(record_path.read_text())
        if record["settings"] != settings:
            changed = sorted(k for k in settings if record["settings"].get(k) != settings[k])
            raise FileExistsError(f"{target.path} holds an unfinished run with other settings ({', '.join(changed)}); "
                                  "pass --overwrite to start again")
        return record
    for sub in ("chunks", "done"):
        (target.work / sub).mkdir(parents=True, exist_ok=True)
    record = {"settings": settings}
    atomic_write_json(record_path, record)
    return record


def segment_large(source: Source, target: LabelsTarget, model: str = "student", *, chunk: int = DEFAULT_CHUNK,
                  halo: int | None = None, diameter: float | None = None, invert: bool | None = None,
                  tile: int = DEFAULT_TILE, decode: DecodeSettings | None = None, executor=None, workers: int = 1,
                  threads: int = 1, overwrite: bool = False,
                  should_stop: Callable[[], bool] | None = None) -> Iterator[Progress]:
    """Segment a large image or stack chunk by chunk into a Zarr labels array, yielding progress.

    ``executor`` is a :class:`DaskExecutor` (cluster) or None for ``workers`` threads here. Stopping
    (``should_stop`` returns True) or a failed chunk leave the work recorded: calling again resumes.
    """
    segmenter = cached_segmenter(model)
    if getattr(segmenter, "kind", "") != "network":
        raise InputError("chunked segmentation needs a network model (teacher, student or a checkpoint)")
    decode = decode or segmenter.decode_settings
    invert = segmenter.invert if invert is None else bool(invert)
    zoom = rescale_factor(diameter, segmenter.train_diameter)
    chunk, halo = chunk_geometry(segmenter, chunk, halo, zoom, decode)
    plan = ChunkPlan(source.planes, source.plane_shape, chunk, halo)
    record = prepare_work(target, run_settings(source, model, plan, zoom, invert, tile, decode), overwrite)
    work = target.work
    own_executor = executor is None
    executor = executor or ThreadExecutor(workers)
    try:
        chunks = list(plan.chunks())
        base = dict(source=source.without_array(), work=str(work))

        def job(c: Chunk, box: Box, **kw) -> Job:
            region = source.read(c.plane, box) if source.kind == "array" else None
            return Job(chunk=c, region=region, **base, **kw)

        def describe(args) -> str:
            return args[0].chunk.describe() if isinstance(args[0], Job) else f"stitching chunks {args[1].key} and {args[2].key}"

        stop = should_stop or (lambda: False)

        # 1. statistics (skipped when recorded)
        if "normalization" not in record:
            parts: dict[int, list[ChunkStats]] = {}

            def stats_jobs():
                for c in chunks:
                    y0, y1, x0, x1 = c.core
                    yield (job(c, (y0, y1, x0, min(x1 + 1, plan.shape[1]))),)

            done = 0
            for (j,), stats in run_tasks(executor, stats_jobs(), chunk_statistics, describe, should_stop):
                parts.setdefault(j.chunk.plane, []).append(stats)
                done += 1
                yield Progress("statistics", done, len(chunks))
            if stop():
                yield Progress("stopped", done, len(chunks))
                return
            norms = []
            for p in range(plan.planes):
                combined = combine(parts[p])
                norms.append([*plane_normalization(combined, invert), combined.maximum])
            record["normalization"] = norms
            atomic_write_json(work / "run.json", record)
        norms = record["normalization"]

        # 2. segment every chunk not recorded yet
        create_local_array(work, plan.planes, plan.shape, plan.chunk)
        rows, cols = plan.grid
        todo = [c for c in chunks if not (work / "chunks" / f"{c.key}.npz").exists()]
        done = len(chunks) - len(todo)
        yield Progress("segment", done, len(chunks))

        def segment_jobs():
            for c in todo:
                neighbours = tuple((n.key, n.outer) for n in (plan.at(c.plane, r, k) for r in range(c.row - 1, c.row + 2)
                                                              for k in range(c.col - 1, c.col + 2)
                                                              if 0 <= r < rows and 0 <= k < cols and (r, k) != (c.row, c.col)))
                yield (job(c, c.outer, model=model, neighbours=neighbours, normalization=tuple(norms[c.plane]),
                           invert=invert, zoom=zoom, tile=tile, threads=threads, decode=decode),)

        for _ in run_tasks(executor, segment_jobs(), segment_chunk, describe, should_stop):
            done += 1
            yield Progress("segment", done, len(chunks))
        if stop():
            yield Progress("stopped", done, len(chunks))
            return

        # 3. stitch: match neighbours, merge, number globally
        index = {c.key: i for i, c in enumerate(chunks)}
        counts, present = [], []
        for c in chunks:
            with np.load(work / "chunks" / f"{c.key}.npz") as f:
                counts.append(int(f["count"]))
                present.append(f["present"])
        offsets = stitch.node_offsets(counts)
        pairs = list(plan.neighbour_pairs())
        edges = []
        for (_, a, b), matched in run_tasks(executor, ((str(work), a, b) for a, b in pairs), match_pair, describe, should_stop):
            edges.append(np.stack([offsets[index[a.key]] + matched[:, 0], offsets[index[b.key]] + matched[:, 1]], 1))
            yield Progress("stitch", len(edges), len(pairs))
        if stop():
            yield Progress("stopped", len(edges), len(pairs))
            return
        tables = stitch.global_ids(counts, present, np.concatenate(edges) if edges else np.zeros((0, 2), np.int64))
        n_objects = int(max((t.max(initial=0) for t in tables), default=0))
        atomic_savez(work / "ids.npz", tables=np.concatenate(tables), offsets=offsets)

        # 4. relabel into the output array
        create_labels_array(target, source, plan.chunk)
        todo = [c for c in chunks if not (work / "done" / c.key).exists()]
        done = len(chunks) - len(todo)
        jobs = ((Job(chunk=c, **base), index[c.key], target) for c in todo)
        for _ in run_tasks(executor, jobs, relabel_chunk, describe, should_stop):
            done += 1
            yield Progress("relabel", done, len(chunks))
        if stop():
            yield Progress("stopped", done, len(chunks))
            return
        finish_target(target, source, {"model": model, "objects": n_objects, **record["settings"]})
        remove_target_work(target)
        yield Progress("done", len(chunks), len(chunks), f"{n_objects} objects")
    finally:
        if own_executor:
            executor.close()


def remove_target_work(target: LabelsTarget) -> None:
    """Delete the work folder of a completed run."""
    import shutil

    shutil.rmtree(target.work, ignore_errors=True)


def run_to_end(steps: Iterator[Progress], on_progress: Callable[[Progress], None] | None = None) -> Progress:
    """Drive :func:`segment_large` to its last progress record."""
    last = Progress("stopped", 0, 0)
    for last in steps:
        if on_progress is not None:
            on_progress(last)
    return last


def os_cpu_count() -> int:
    """CPUs this process may use (the default number of local workers)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
