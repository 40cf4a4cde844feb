"""Chunked segmentation of images and volumes larger than memory, on threads or a ``dask.distributed`` cluster.

A 2D model segments planes in 2D chunks; a 3D model segments (Z,Y,X) volumes in 3D chunks with a
halo in z, y and x. Four stages, each a set of independent tasks (one per chunk, or per pair of
neighbouring chunks):

1. ``statistics``: value and noise histograms of every chunk, combined into each plane's (volume's)
   normalisation, so chunks are normalised as the whole would be (exactly, for 8/16-bit gray);
2. ``segment``: network and decoder on each chunk plus a halo; the core's labels (local ids) go to a
   Zarr array, the labels where the haloed box overlaps each neighbour's (by a face, an edge or a
   corner) to a record file;
3. ``stitch``: objects of neighbouring chunks matched by overlap there and merged (:mod:`.stitch`);
4. ``relabel``: every core chunk's local ids replaced by global ids in the output Zarr array.

Finished chunks leave a record in the run's work folder (``<output>.partial``), so a re-run skips them;
the folder is removed when the labels are complete. Workers load the model once per process.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..preprocess import MAX_WORKING_PIXELS, InputError
from . import stitch
from .chunks import DEFAULT_CHUNK, Box, Chunk, ChunkPlan, round_up
from .stats import ChunkStats, combine, plane_normalization
from .worker import Job, check_volume_shape, chunk_statistics, match_pair, model_facts, relabel_chunk, segment_chunk
from .zarr_io import (LabelsTarget, Source, atomic_savez, atomic_write_json, create_labels_array, create_local_array,
                      finish_target, remove_target)

# Context around each chunk, in px at the training scale: the largest nuclei (~80 px) plus the reach of the
# network (32 px, as its seamless tiling keeps) and of the decoder's longest affinity (27 grid px at half resolution).
HALO = 128
# 3D chunks, in working voxels in-plane (z: divided by the anisotropy of the model's training voxels). A haloed chunk of
# the default core is (160 + 2 x 64)^3 = 24 M working voxels at most (about 0.2 KB each at the peak: network output,
# affinities, decoder; docs/volumes.md); the halo holds an object reaching one training diameter beyond a face, the
# network's context beyond a tile face (as its 3D tiling keeps) and the decoder's reach.
DEFAULT_CHUNK_3D = 160
NETWORK_REACH_3D = 8


class ChunkError(RuntimeError):
    """A chunk failed; the message names it in one line (finished chunks stay recorded)."""


@dataclass(frozen=True)
class Progress:
    """Where a run stands: stage (statistics, segment, stitch, relabel, done, stopped), tasks done of total."""

    stage: str
    done: int
    total: int
    message: str = ""


# ----------------------------------------------------------------------------------------------- executors


class ThreadExecutor:
    """Tasks on threads of this process (tests, napari, single machine without a cluster)."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self.pool = concurrent.futures.ThreadPoolExecutor(self.workers)

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


def chunk_geometry(align: int, chunk: int | None, halo: int | None, zoom: float) -> tuple[int, int]:
    """Chunk and halo rounded to ``align`` so every haloed box starts on the grids of the network and the decoder."""
    if isinstance(chunk, (tuple, list)) or isinstance(halo, (tuple, list)):
        raise InputError("three chunk or halo sizes (Z,Y,X) apply to 3D models; give one size in px for 2D chunks")
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    halo = HALO / min(zoom, 1.0) if halo is None else halo
    return round_up(max(chunk, align), align), round_up(halo, align)


def volume_geometry(facts: dict, chunk: int | tuple[int, ...] | None,
                    halo: int | tuple[int, ...] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """3D chunk and halo per axis (z, y, x) in voxels of the volume, rounded up to the network's and decoder's grid.

    A number (or the default) is the in-plane side; z follows in proportion, so that a chunk spans
    about as much of the object in z as in y and x: it is divided by the anisotropy of the model's
    training voxels and converted through each axis' rescaling. Three numbers are taken as given.
    The default halo (working voxels) is the training diameter plus the network's and the decoder's reach per axis.
    """
    scale, align, aniso = facts["zoom"], facts["align"], facts["anisotropy"]

    def voxels(working: float, axis: int) -> float:  # working voxels in-plane -> voxels of this axis
        return working / (aniso if axis == 0 else 1.0) / scale[axis]

    if chunk is None:
        chunk = tuple(voxels(DEFAULT_CHUNK_3D, a) for a in range(3))
    elif not isinstance(chunk, (tuple, list)):
        chunk = tuple(voxels(chunk * scale[1], a) for a in range(3))
    if halo is None:
        halo = tuple((facts["diameter"] / (aniso if a == 0 else 1.0) + NETWORK_REACH_3D + facts["reach"][a]) / scale[a]
                     for a in range(3))
    elif not isinstance(halo, (tuple, list)):
        halo = tuple(voxels(halo * scale[1], a) for a in range(3))
    sides = tuple(round_up(max(math.ceil(c), m), m) for c, m in zip(chunk, align))
    return sides, tuple(round_up(math.ceil(h), m) for h, m in zip(halo, align))


def check_chunk_work(chunk: int | tuple[int, ...], halo: int | tuple[int, ...], zoom: float | list[float],
                     diameter: float | None, max_voxels: int | None = None) -> None:
    """InputError when one haloed chunk, rescaled to the model's object size, exceeds MAX_WORKING_PIXELS
    (a 3D chunk: ``max_voxels``)."""
    if isinstance(zoom, (tuple, list)):
        sides = [(c + 2 * h) * f for c, h, f in zip(chunk, halo, zoom)]
        if math.prod(sides) > max_voxels:
            shape = "x".join(str(c + 2 * h) for c, h in zip(chunk, halo))
            raise InputError(f"each {shape} voxel chunk (with halo) would be {'x'.join(f'{s:.0f}' for s in sides)} "
                             f"voxels once rescaled (more than {max_voxels:,}); check the voxel size and diameter, "
                             "or give a smaller --chunk")
        return
    side = (chunk + 2 * halo) * zoom
    if side * side > MAX_WORKING_PIXELS:
        raise InputError(f"nucleus diameter {diameter} rescales each {chunk + 2 * halo} px chunk (with halo) to "
                         f"{side:,.0f} px per side (more than {MAX_WORKING_PIXELS:,} px); give the diameter in pixels "
                         "of this image or a smaller --chunk")


def run_settings(source: Source, model: str, plan: ChunkPlan, zoom: float | list[float], invert: bool,
                 tile: int | None, decode: dict) -> dict:
    """What a resumed run must share with the unfinished one (as JSON gives it back: lists, not tuples)."""
    settings = {"input": source.path or "<array>", "shape": list(source.shape), "axes": source.axes, "model": model,
                "chunk": plan.chunk, "halo": plan.halo, "zoom": zoom, "invert": invert, "tile": tile, "decode": decode}
    if source.volume:
        settings.update(chunk=list(plan.sides), halo=list(plan.halos), zoom=list(zoom), volume=True)
    return settings


def prepare_work(target: LabelsTarget, settings: dict, overwrite: bool) -> dict:
    """The run record: a new work folder, or the unfinished run's when its settings match."""
    record_path = target.work / "run.json"
    if overwrite:
        remove_target(target)
    if Path(target.path).exists() and not target.work.exists():
        raise FileExistsError(f"{target.path} exists; pass --overwrite (overwrite=True) or choose another output")
    if record_path.exists():
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


def segment_large(source: Source, target: LabelsTarget, model: str = "student", *,
                  chunk: int | tuple[int, ...] | None = None, halo: int | tuple[int, ...] | None = None,
                  diameter: float | None = None, invert: bool | None = None, tile: int | None = None,
                  decode: dict | None = None, voxel_size: tuple[float, float, float] | None = None, executor=None,
                  workers: int = 1, threads: int = 0, overwrite: bool = False,
                  should_stop: Callable[[], bool] | None = None) -> Iterator[Progress]:
    """Segment a large image, stack or volume chunk by chunk into a Zarr labels array, yielding progress.

    A 2D model segments planes in ``chunk`` px squares (default DEFAULT_CHUNK); a 3D model segments
    the (Z,Y,X) volumes of the source (a (T,Z,Y,X) series volume by volume) in 3D chunks, rescaled
    per axis by ``voxel_size`` (z, y, x) as :func:`~napari_graphkd.segment.segment_any` does
    (``chunk``/``halo``: a number for the in-plane side, z in proportion, or three numbers, see
    :func:`volume_geometry`). ``executor`` is a :class:`DaskExecutor` (cluster) or None for
    ``workers`` threads here; ``threads`` sets torch's threads in each worker (0 leaves them);
    ``decode`` overrides the model's decoder settings (``DecodeSettings`` fields). Stopping
    (``should_stop`` returns True) or a failed chunk leave the work recorded: calling again with the
    same arguments resumes.
    """
    own_executor = executor is None
    executor = executor or ThreadExecutor(workers)
    try:
        facts = executor.submit(model_facts, model, diameter, decode, voxel_size).result()
        if facts["ndim"] == 3:
            source = source.as_volume()
            executor.submit(check_volume_shape, source.spatial_shape).result()
        decode = facts["decode"]
        invert = facts["invert"] if invert is None else bool(invert)
        zoom = facts["zoom"]
        if facts["ndim"] == 3:
            chunk, halo = volume_geometry(facts, chunk, halo)
        else:
            chunk, halo = chunk_geometry(facts["align"], chunk, halo, zoom)
        check_chunk_work(chunk, halo, zoom, diameter, facts.get("max_voxels"))
    except BaseException:
        if own_executor:
            executor.close()
        raise
    plan = ChunkPlan(source.planes, source.spatial_shape, chunk, halo)
    work = target.work
    try:
        record = prepare_work(target, run_settings(source, model, plan, zoom, invert, tile, decode), overwrite)
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
            parts: dict[int, ChunkStats] = {}  # running total per plane (a histogram pair is 1.5 MB per chunk)

            def stats_jobs():  # the core with one more index on the second axis (worker.chunk_statistics)
                for c in chunks:
                    yield (job(c, (*c.core[:3], min(c.core[3] + 1, plan.shape[1]), *c.core[4:])),)

            done = 0
            for (j,), stats in run_tasks(executor, stats_jobs(), chunk_statistics, describe, should_stop):
                plane = j.chunk.plane
                parts[plane] = combine([parts[plane], stats]) if plane in parts else stats
                done += 1
                yield Progress("statistics", done, len(chunks))
            if stop():
                yield Progress("stopped", done, len(chunks))
                return
            norms = []
            for p in range(plan.planes):
                combined = parts[p]
                norms.append([*plane_normalization(combined, invert), combined.maximum])
            record["normalization"] = norms
            atomic_write_json(work / "run.json", record)
        norms = record["normalization"]

        # 2. segment every chunk not recorded yet
        create_local_array(work, plan.planes, plan.shape, plan.sides)
        todo = [c for c in chunks if not (work / "chunks" / f"{c.key}.npz").exists()]
        done = len(chunks) - len(todo)
        yield Progress("segment", done, len(chunks))

        def segment_jobs():
            for c in todo:
                neighbours = tuple((n.key, n.outer) for n in plan.neighbours(c))
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
        create_labels_array(target, source, plan.sides)
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
    shutil.rmtree(target.work, ignore_errors=True)


def run_to_end(steps: Iterator[Progress], on_progress: Callable[[Progress], None] | None = None) -> Progress:
    """Drive :func:`segment_large` to its last progress record."""
    last = Progress("stopped", 0, 0)
    for last in steps:
        if on_progress is not None:
            on_progress(last)
    return last

