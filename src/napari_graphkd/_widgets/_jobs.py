"""Work the widgets run in a napari ``thread_worker``: segmentation, re-decoding and overlays.

Jobs are generators that yield progress in [0, 1] and return a result object; they never raise
(errors come back as a message for a notification) and they check a ``threading.Event`` to stop.
Everything here calls the library; nothing touches the viewer.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generator, Hashable, TypeVar

import numpy as np

from ..graph import affinity_disagreement, agreement, at_size, edge_cosines, edge_vectors, graph_disagreement
from ..graph import instance_embeddings, instance_graph
from ..guidance import assess
from ..io.checkpoint import CheckpointError
from ..preprocess import InputError
from ..segment import InputDecision, OutputCache, RunSettings, Stopped, plane_output, segment_any
from ._layers import KEY, Placement, plane_data, stack_planes, with_plane_axis
from ._state import CACHE, MODELS

log = logging.getLogger(__name__)
T = TypeVar("T")
POLL_SECONDS = 0.05  # how often a waiting job looks at its cancel event
CANCEL_GRACE = 0.6  # seconds a cancelled run gets to stop by itself before it is abandoned


@dataclass(frozen=True)
class SegmentRequest:
    """One segmentation (or re-decoding) of some planes of an image layer by some models."""

    image_id: str
    image_name: str
    data: Any  # the layer's data; the cache checks it is still the same object
    planes: tuple[int | None, ...]
    models: tuple[tuple[str, str], ...]  # (role, spec): role is teacher, student or classical
    run: RunSettings = RunSettings()
    overrides: dict | None = None  # decoder settings replacing each model's tuned ones
    network: bool = True  # False: re-decode cached network outputs only
    ground_truth: Any = None  # Labels layer data to score against, or None
    placement: Placement | None = None  # where result layers go (not used by the job)
    runs: dict | None = None  # role -> RunSettings replacing ``run`` (what the rules chose last time, to re-decode)


@dataclass
class ModelResult:
    """Labels of one model on the requested planes, with timings and scores."""

    role: str
    spec: str
    name: str
    description: dict
    labels: np.ndarray
    network_seconds: float
    decode_seconds: float
    cached: bool
    decode: dict | None
    inputs: str = ""  # what the input rules chose (diameter, inversion, channel)
    decision: InputDecision | None = None
    diameter: float = 0.0  # nucleus diameter (px) the image was segmented at
    invert: bool = False
    objects: int = 0
    advice: list[str] = field(default_factory=list)  # guidance.assess: how to fix an out-of-range result
    ground_truth: dict | None = None
    volume: bool = False  # one 3D segmentation of a (Z,Y,X) layer (a 3D model), not planes


@dataclass
class JobResult:
    """What every widget job hands back: its results, or why there are none."""

    request: Any
    models: list[ModelResult] = field(default_factory=list)
    agreement: dict | None = None
    layers: list[tuple] = field(default_factory=list)  # napari LayerData tuples (overlays)
    finetune: Any = None  # the library's FinetuneResult (fine-tune jobs)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    cancelled: bool = False


def _message(exc: Exception) -> str:
    """Notification text: our own errors explain themselves, others get their type."""
    if isinstance(exc, (InputError, CheckpointError)):
        return str(exc)
    log.exception("napari-graphkd job failed")
    return f"{type(exc).__name__}: {exc}"


def _guard(job, request):
    """Run generator ``job``, turning a stop request and errors into a JobResult."""
    try:
        return (yield from job)
    except Stopped:
        return JobResult(request, cancelled=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a notification, never a crash
        return JobResult(request, error=_message(exc))


def relay(work: Callable[[Callable[[Any], None]], T], cancel: threading.Event | None = None) -> Generator[Any, None, T]:
    """Run ``work(report)`` in a thread of its own; yield what it reports; return its result (or raise its error).

    The library reports progress through callbacks from deep inside a run (per tile); a worker
    generator can only yield, so the callbacks go through a queue. When ``cancel`` is set, the
    work gets CANCEL_GRACE seconds to stop by itself; then the job ends with :class:`Stopped` and
    the thread is left to stop at its next check, its result discarded (cancel answers within a second).
    """
    records: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}
    done = object()

    def run() -> None:
        try:
            outcome["value"] = work(records.put)
        except BaseException as exc:  # noqa: BLE001 - handed to the generator, which re-raises it
            outcome["error"] = exc
        finally:
            records.put(done)

    threading.Thread(target=run, name="graphkd-job", daemon=True).start()
    cancelled_at = None
    while True:
        try:
            record = records.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if cancel is not None and cancel.is_set():
                cancelled_at = cancelled_at or time.monotonic()
                if time.monotonic() - cancelled_at > CANCEL_GRACE:
                    raise Stopped from None
            continue
        if record is done:
            break
        yield record
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def layer_cache(image_id: str, model_key: Hashable, data: Any, allow_run: bool = True) -> OutputCache:
    """The shared network-output cache for one image layer and model (valid while the layer holds ``data``)."""
    def fetch(key: Hashable, compute):
        def guarded():
            if not allow_run:
                raise InputError("the network output is no longer cached (memory limit or changed image); press Run again")
            return compute()

        return CACHE.fetch((image_id, model_key, key), data, guarded)

    return fetch


def segment_job(request: SegmentRequest, cancel: threading.Event):
    """Segment (or re-decode) every requested plane with every requested model."""
    return (yield from _guard(_segment(request, cancel), request))


def _segment(request: SegmentRequest, cancel: threading.Event):
    result = JobResult(request)
    planes = None if request.planes == (None,) else list(request.planes)
    for i, (role, spec) in enumerate(request.models):
        key, segmenter = MODELS.get(spec)
        decode = None if segmenter.kind != "network" else replace(segmenter.decode_settings, **(request.overrides or {}))
        cache = layer_cache(request.image_id, key, request.data, request.network)

        run = (request.runs or {}).get(role, request.run)

        def work(report, segmenter=segmenter, decode=decode, cache=cache, run=run):
            return segment_any(segmenter, request.data, **run.kwargs(), decode=decode, planes=planes, cache=cache,
                               on_progress=report, should_stop=cancel.is_set)

        seg = yield from _scaled(relay(work, cancel), i, len(request.models))
        labels = seg.labels
        description = segmenter.describe()
        diameter = seg.inputs.diameter or segmenter.train_diameter
        model = ModelResult(role, spec, segmenter.name, description, labels, seg.network_seconds, seg.decode_seconds,
                            seg.cached, None if decode is None else decode.to_dict(), inputs=seg.inputs.describe(),
                            decision=seg.inputs, diameter=float(diameter), invert=bool(seg.inputs.invert),
                            objects=seg.objects, advice=assess(seg, description, plane_data(request.data, request.planes[0])))
        if request.ground_truth is not None:
            gt = stack_planes([plane_data(request.ground_truth, p) for p in request.planes], list(request.planes))
            if gt.shape == labels.shape:
                model.ground_truth = agreement(gt, labels, volume=seg.volume)
            else:
                result.warnings.append(f"ground truth {gt.shape} does not match the result {labels.shape}; not scored")
        model.volume = seg.volume
        result.models.append(model)
    by_role = {m.role: m for m in result.models}
    if "teacher" in by_role and "student" in by_role:
        volume = by_role["teacher"].volume and by_role["student"].volume
        result.agreement = agreement(by_role["teacher"].labels, by_role["student"].labels, volume=volume)
    return result


def _scaled(progress: Generator[float, None, T], index: int, count: int) -> Generator[float, None, T]:
    """Yield the fractions of job ``index`` of ``count`` as fractions of the whole; return its result."""
    while True:
        try:
            fraction = next(progress)
        except StopIteration as stop:
            return stop.value
        yield (index + fraction) / count


@dataclass(frozen=True)
class Source:
    """A segmentation result to draw overlays for: its labels plane and how its network was run."""

    name: str
    labels: np.ndarray  # (H,W) plane, or the (Z,Y,X) volume of a 3D model
    image_id: str
    image_data: Any
    image_plane: int | None  # None: a 2D image, or the whole volume
    spec: str
    model: str
    run: RunSettings


@dataclass(frozen=True)
class OverlayRequest:
    """Overlays of one result (``kind`` affinity or graph) or of a teacher/student pair (disagreement)."""

    kind: str
    source: Source
    other: Source | None
    placement: Placement
    stacked: bool  # the result layers are stacks: overlays get a plane axis
    k: int = 4
    max_distance: float | None = None
    offset: int = 0  # affinity map: index into the model's offsets of the one channel shown


def overlay_job(request: OverlayRequest, cancel: threading.Event):
    """Layer data for the requested overlay."""
    return (yield from _guard(_overlay(request, cancel), request))


def _maps(source: Source, cancel: threading.Event) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Embedding (C,*spatial), affinities (K,*spatial) of a source at the size of its labels, and their offsets."""
    key, segmenter = MODELS.get(source.spec)
    output, _ = plane_output(segmenter, source.image_data, source.image_plane, **source.run.kwargs(),
                             cache=layer_cache(source.image_id, key, source.image_data), should_stop=cancel.is_set)
    shape = source.labels.shape
    offsets = [list(o) for o in output.affinity_offsets]
    return at_size(output.full_embedding(), shape), at_size(output.affinities(), shape), offsets


def _overlay(request: OverlayRequest, cancel: threading.Event):
    src, other = request.source, request.other
    pl, stacked = request.placement, request.stacked
    result = JobResult(request)
    embedding, affinities, offsets = yield from relay(lambda report: _maps(src, cancel), cancel)
    meta = {"source_labels": src.name, "model": src.model, "model_spec": src.spec, "offsets": offsets}
    yield 0.5
    if request.kind == "affinity":
        if not 0 <= request.offset < len(offsets):
            raise InputError(f"{src.model} has {len(offsets)} affinity offsets; choose one of them")
        channel = affinities[request.offset]
        result.layers.append((channel[None] if stacked else channel,
                              {"name": f"{src.name} affinity {offset_name(offsets[request.offset])}", "colormap": "magma",
                               "contrast_limits": (0.0, 1.0), "blending": "additive", "opacity": 0.6,
                               "metadata": {KEY: dict(meta, kind="affinity", offset=offsets[request.offset])},
                               **pl.kwargs()}, "image"))
    elif request.kind == "graph":
        graph = instance_graph(embedding, src.labels, request.k, request.max_distance)
        graph_meta = dict(meta, k=request.k, max_distance=request.max_distance)
        result.layers.append(_nodes(src.name, graph, pl, stacked, dict(graph_meta, kind="graph nodes")))
        features = {"similarity": graph.similarity, "source_id": graph.ids[graph.edges[:, 0]], "target_id": graph.ids[graph.edges[:, 1]]}
        result.layers.append(_edges(f"{src.name} graph edges", graph, features, "similarity", "viridis", (-1.0, 1.0),
                                    pl, stacked, dict(graph_meta, kind="graph edges")))
    else:
        other_embedding, other_affinities, other_offsets = yield from relay(lambda report: _maps(other, cancel), cancel)
        if other_offsets != offsets:
            raise InputError(f"{src.model} and {other.model} use different affinity offsets (2D and 3D models?); "
                             "compare results of models of one kind")
        pair = dict(meta, other_labels=other.name, other_model=other.model, other_model_spec=other.spec)
        diff = affinity_disagreement(affinities, other_affinities)
        result.layers.append((diff[None] if stacked else diff,
                              {"name": f"{src.name} vs {other.name} affinity disagreement", "colormap": "inferno",
                               "contrast_limits": (0.0, 1.0), "blending": "additive", "opacity": 0.7,
                               "metadata": {KEY: dict(pair, kind="affinity disagreement")},
                               **pl.kwargs()}, "image"))
        graph = instance_graph(embedding, src.labels, request.k, request.max_distance)
        other_nodes = instance_embeddings(other_embedding, src.labels)
        features = {"disagreement": graph_disagreement(graph, other_nodes), "cos_teacher": graph.similarity,
                    "cos_student": edge_cosines(other_nodes, graph.edges), "source_id": graph.ids[graph.edges[:, 0]],
                    "target_id": graph.ids[graph.edges[:, 1]]}
        result.layers.append(_edges(f"{src.name} vs {other.name} graph disagreement", graph, features, "disagreement",
                                    "inferno", (0.0, 1.0), pl, stacked,
                                    dict(pair, kind="graph disagreement", k=request.k, max_distance=request.max_distance)))
    yield 1.0
    return result


def offset_name(offset) -> str:
    """Readable name of an affinity offset, e.g. ``3 px up`` for (-3, 0), ``2 planes back`` for (-2, 0, 0)."""
    *z, dy, dx = offset
    words = []
    if z and z[0]:
        words.append(f"{abs(z[0])} plane{'s' if abs(z[0]) > 1 else ''} {'back' if z[0] < 0 else 'on'}")
    if dy:
        words.append(f"{abs(dy)} px {'up' if dy < 0 else 'down'}")
    if dx:
        words.append(f"{abs(dx)} px {'left' if dx < 0 else 'right'}")
    return ", ".join(words)


def _nodes(name: str, graph, pl: Placement, stacked: bool, meta: dict) -> tuple:
    """Points layer data of graph nodes at instance centroids."""
    return (with_plane_axis(graph.centroids, stacked),
            {"name": f"{name} graph nodes", "features": {"id": graph.ids}, "size": 7, "face_color": "white",
             "border_color": "black", "metadata": {KEY: meta}, **pl.kwargs()}, "points")


def _edges(name: str, graph, features: dict, color_by: str, colormap: str, limits, pl: Placement, stacked: bool, meta: dict) -> tuple:
    """Vectors layer data of graph edges coloured by one of their features."""
    return (with_plane_axis(edge_vectors(graph.centroids, graph.edges), stacked),
            {"name": name, "features": features, "edge_color": color_by, "edge_colormap": colormap,
             "edge_contrast_limits": limits, "edge_width": 2, "vector_style": "line",
             "metadata": {KEY: meta}, **pl.kwargs()}, "vectors")


STAGES = ("statistics", "segment", "stitch", "relabel")


@dataclass(frozen=True)
class LargeRequest:
    """Chunked segmentation of a lazy (dask, zarr, multiscale) image layer by one network model into a Zarr store."""

    image_id: str
    image_name: str
    data: Any  # the full-resolution array (never loaded whole)
    role: str
    spec: str
    output: str  # the .zarr path the labels go to (in the widget's cache folder)
    chunk: int
    diameter: float | None
    invert: bool | None
    tile: int
    overrides: dict | None
    placement: Placement | None = None


def large_job(request: LargeRequest, cancel: threading.Event):
    """Run :func:`segment_large` on threads in this process; the result's labels are the Zarr array, opened lazily."""
    return (yield from _guard(_large(request, cancel), request))


def stage_fraction(stage: str, done: int, total: int) -> float:
    """Progress of a chunked run in [0, 1]: its four stages weigh the same."""
    if stage not in STAGES:
        return 1.0
    return (STAGES.index(stage) + (done / total if total else 1.0)) / len(STAGES)


def _large(request: LargeRequest, cancel: threading.Event):
    import dask.array as da

    from ..large import LabelsTarget, from_array, segment_large
    from ..large.zarr_io import remove_target

    target = LabelsTarget(request.output)
    start = time.perf_counter()
    last = None
    try:
        for last in segment_large(from_array(request.data), target, request.spec, chunk=request.chunk,
                                  diameter=request.diameter, invert=request.invert, tile=request.tile,
                                  decode=request.overrides, workers=1, should_stop=cancel.is_set):
            yield stage_fraction(last.stage, last.done, last.total)
    finally:
        if last is None or last.stage != "done":
            remove_target(target)  # a stopped or failed run leaves nothing behind
    if last.stage != "done":
        return JobResult(request, cancelled=True)
    labels = da.from_zarr(target.array_path)
    key, segmenter = MODELS.get(request.spec)
    objects = int(last.message.split()[0]) if last.message else 0
    diameter = request.diameter or segmenter.train_diameter
    model = ModelResult(request.role, request.spec, segmenter.name, segmenter.describe(), labels,
                        time.perf_counter() - start, 0.0, False, request.overrides, inputs=f"chunked, {request.chunk} px chunks",
                        diameter=float(diameter), invert=bool(request.invert), objects=objects)
    return JobResult(request, models=[model])
