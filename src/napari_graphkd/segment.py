"""Segmenters (a bundled or user network, or the classical pipeline) and the one pipeline every caller runs.

:func:`segment_any` is that pipeline (CLI, widgets, fine-tune scoring, benchmarks): the image's
shape decides its planes (:func:`napari_graphkd.planes.plane_layout`, the one stack rule), the
input rules decide the nucleus diameter and inversion once per image (:func:`decide_inputs`), then
each plane is prepared at the model's scale, run through the network (outputs optionally cached)
and decoded.
Progress is reported per tile and per plane; a stop request ends the run at the next tile.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Hashable, Protocol, Sequence

import numpy as np

from .decode.classical import ClassicalSettings, segment_classical
from .decode.mws import DecodeSettings
from .decode.policy import decode_output
from .inference import (DEFAULT_TILE, MAX_WORKING_PIXELS, TRAIN_DIAMETER, NetworkOutput, network_output,
                        prepare_image, rescale_factor, working_image, working_shape)
from .io.checkpoint import CheckpointError, load_checkpoint
from .models import EmbeddingUNet, count_parameters
from .planes import plane_layout
from .preprocess import InputError

BUNDLED = {"teacher": "teacher.safetensors", "student": "student.safetensors"}
AUTO = "auto"  # diameter chosen per image by the input rules

Diameter = float | str | None
Fetch = Callable[[Callable[[], NetworkOutput]], tuple[NetworkOutput, bool]]
OutputCache = Callable[[Hashable, Callable[[], NetworkOutput]], tuple[NetworkOutput, bool]]
OnTile = Callable[[int, int], None]


class Stopped(Exception):
    """The caller's ``should_stop`` turned true: the run ended early."""


@dataclass(frozen=True)
class RunSettings:
    """How an image is run: nucleus diameter (px, ``auto`` or None = as trained), inversion (None = the model's), tile size."""

    diameter: Diameter = None
    invert: bool | None = None
    tile: int = DEFAULT_TILE

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`segment_any`."""
        return {"diameter": self.diameter, "invert": self.invert, "tile": self.tile}


@dataclass(frozen=True)
class InputDecision:
    """What the input rules chose for one image: the diameter it is rescaled from and the inversion."""

    diameter: float | None  # nucleus diameter (px) in the image; None: as the model was trained
    invert: bool

    def describe(self) -> str:
        """Short text for reports: ``as trained`` or ``40 px``, plus ``, inverted``."""
        size = "as trained" if self.diameter is None else f"{self.diameter:.3g} px"
        return size + (", inverted" if self.invert else "")


@dataclass
class SegmentResult:
    """Labels of one image (or plane) plus where the time went and what the input rules chose."""

    labels: np.ndarray
    network_seconds: float
    decode_seconds: float
    output: NetworkOutput | None = None  # the network output of a 2D image (None for stacks and classical)
    inputs: InputDecision | None = None
    cached: bool = False  # every network output came from the cache

    @property
    def objects(self) -> int:
        """Number of objects, summed over the planes of a stack."""
        return count_objects(self.labels)


class Segmenter(Protocol):
    """What the pipeline needs of a model: its defaults, a description, and one plane's labels."""

    kind: str  # "network" or "classical"
    name: str
    train_diameter: float  # nucleus diameter (px) its settings were made for
    invert: bool  # default inversion
    decode_settings: DecodeSettings | None

    @property
    def parameters(self) -> int: ...

    def describe(self) -> dict[str, Any]: ...

    def segment_plane(self, plane: np.ndarray, inputs: InputDecision, *, tile: int, decode: DecodeSettings | None,
                      fetch: Fetch, on_tile: OnTile | None) -> SegmentResult: ...


def count_objects(labels: np.ndarray) -> int:
    """Objects in a label image; for a stack, the sum over its planes (ids may repeat across planes)."""
    planes = np.asarray(labels).reshape(-1, *np.shape(labels)[-2:])
    return int(sum(np.count_nonzero(np.unique(plane)) for plane in planes))


def bundled_path(name: str) -> Path:
    """Path of a checkpoint shipped inside the package."""
    return Path(str(resources.files("napari_graphkd") / "weights" / BUNDLED[name]))


def check_diameter(diameter: Diameter) -> Diameter:
    """The diameter as a positive finite float (None or ``auto`` as given); InputError otherwise."""
    if diameter is None or diameter == AUTO:
        return diameter
    try:
        value = float(diameter)
    except (TypeError, ValueError):
        raise InputError(f"nucleus diameter {diameter!r} is not a number (or 'auto')") from None
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"nucleus diameter must be a positive number of pixels, got {diameter}")
    return value


def requested_diameter(diameter: Diameter) -> float | None:
    """The diameter a caller asked for, checked; None when it is left to the model (None or ``auto``)."""
    value = check_diameter(diameter)
    return None if value == AUTO else value


def decide_inputs(segmenter: Segmenter, image: Any, diameter: Diameter = None, invert: bool | None = None) -> InputDecision:
    """The input rules of one image (2D or stack): the nucleus diameter it is rescaled from, and its inversion.

    Refuses a diameter whose rescaled planes would exceed MAX_WORKING_PIXELS.
    """
    chosen = requested_diameter(diameter)
    if chosen is not None:
        h, w = plane_layout(np.shape(image))[1][:2]
        scale = rescale_factor(chosen, segmenter.train_diameter)
        big = working_shape((h, w), scale)
        if big[0] * big[1] > MAX_WORKING_PIXELS:
            raise InputError(f"nucleus diameter {chosen:g} px would rescale each {h}x{w} plane to {big[0]}x{big[1]} px "
                             f"(more than {MAX_WORKING_PIXELS:,}); give the diameter in pixels of this image")
    return InputDecision(chosen, segmenter.invert if invert is None else bool(invert))


class ModelSegmenter:
    """A network plus its decoder settings and input defaults (from its checkpoint metadata)."""

    kind = "network"

    def __init__(self, path: str | Path | None = None, name: str | None = None, *,
                 model: EmbeddingUNet | None = None, metadata: dict[str, Any] | None = None):
        """Load the checkpoint at ``path``, or wrap a ``model`` already in memory with its ``metadata``."""
        self.path = None if path is None else Path(path)
        self.model, self.metadata = load_checkpoint(self.path) if model is None else (model, metadata or {})
        self.name = name or (self.path.stem if self.path else self.metadata.get("name", "network"))
        self.decode_settings = DecodeSettings(**self.metadata.get("decode", {}))
        self.train_diameter = float(self.metadata.get("train_diameter", TRAIN_DIAMETER))
        self.invert = bool(self.metadata.get("input", {}).get("invert", False))

    @property
    def parameters(self) -> int:
        """Number of network parameters."""
        return count_parameters(self.model)

    def describe(self) -> dict[str, Any]:
        """Metadata plus parameter count, for ``graphkd info`` and the widgets."""
        return dict(self.metadata, parameters=self.parameters, path=None if self.path is None else str(self.path))

    def run_network(self, image: np.ndarray, *, diameter: float | None = None, invert: bool | None = None,
                    tile: int = DEFAULT_TILE, on_tile: OnTile | None = None) -> NetworkOutput:
        """Network output for one 2D plane (cache it to re-decode with other settings); its time includes preparation."""
        start = time.perf_counter()
        scale = rescale_factor(diameter, self.train_diameter)
        working = working_image(image, invert=self.invert if invert is None else invert, scale=scale)
        output = network_output(self.model, working, tuple(np.shape(image)[:2]), scale, tile, on_tile)
        output.seconds = time.perf_counter() - start
        return output

    def segment_plane(self, plane: np.ndarray, inputs: InputDecision, *, tile: int = DEFAULT_TILE,
                      decode: DecodeSettings | None = None, fetch: Fetch | None = None,
                      on_tile: OnTile | None = None) -> SegmentResult:
        """Labels of one 2D plane: the network output (from ``fetch``'s cache or computed), decoded."""
        def compute() -> NetworkOutput:
            return self.run_network(plane, diameter=inputs.diameter, invert=inputs.invert, tile=tile, on_tile=on_tile)

        output, cached = fetch(compute) if fetch is not None else (compute(), False)
        labels, seconds = decode_output(output, decode or self.decode_settings)
        return SegmentResult(labels, output.seconds, seconds, output, inputs, cached)


class ClassicalSegmenter:
    """Otsu + hole filling + distance-transform watershed (what a CellProfiler user runs today)."""

    kind = "classical"
    name = "classical"
    parameters = 0
    train_diameter = TRAIN_DIAMETER  # its settings are in pixels at the networks' training diameter
    invert = False
    decode_settings = None

    def __init__(self, settings: ClassicalSettings = ClassicalSettings()):
        self.settings = settings

    def describe(self) -> dict[str, Any]:
        """Parameters of the classical pipeline."""
        return {"name": "classical", "architecture": "otsu+watershed", "parameters": 0, "settings": self.settings.to_dict()}

    def segment_plane(self, plane: np.ndarray, inputs: InputDecision, *, tile: int = DEFAULT_TILE,
                      decode: DecodeSettings | None = None, fetch: Fetch | None = None,
                      on_tile: OnTile | None = None) -> SegmentResult:
        """Labels of one 2D plane; the diameter scales the peak distance and minimum size."""
        gray = prepare_image(plane, invert=inputs.invert)
        factor = 1.0 if inputs.diameter is None else inputs.diameter / self.train_diameter
        start = time.perf_counter()
        labels = segment_classical(gray, self.settings.scaled(factor))
        return SegmentResult(labels, 0.0, time.perf_counter() - start, None, inputs)


def load_segmenter(spec: str) -> ModelSegmenter | ClassicalSegmenter:
    """``teacher``/``student`` (bundled), ``classical``, or a checkpoint path."""
    if spec == "classical":
        return ClassicalSegmenter()
    if spec in BUNDLED:
        path = bundled_path(spec)
        if not path.exists():
            raise CheckpointError(f"the bundled {spec} is missing from this installation ({path})")
        return ModelSegmenter(path, name=spec)
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"model {spec!r} is neither teacher, student, classical nor an existing checkpoint file")
    return ModelSegmenter(path)


def _fetcher(cache: OutputCache | None, index: tuple[int, ...], inputs: InputDecision, tile: int) -> Fetch:
    """``fetch`` of one plane: the cache under the plane's key (index, input rules, tile), or always compute."""
    if cache is None:
        return lambda compute: (compute(), False)
    key = (index or None, inputs, tile)
    return lambda compute: cache(key, compute)


def _stopper(should_stop: Callable[[], bool] | None) -> Callable[[], None]:
    """A check that raises :class:`Stopped` once ``should_stop()`` is true."""
    def check() -> None:
        if should_stop is not None and should_stop():
            raise Stopped

    return check


def _plane_indices(stack: tuple[int, ...], planes: Sequence[int] | None, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Index tuples of the planes to run: all of them, or ``planes`` along the one stack axis."""
    if planes is None:
        return list(np.ndindex(*stack))
    if len(stack) != 1:
        raise InputError(f"choosing planes needs a (Z,Y,X) stack; the image has shape {shape}")
    bad = [p for p in planes if not 0 <= p < stack[0]]
    if bad:
        raise InputError(f"plane {bad[0]} is outside the {stack[0]}-plane stack")
    return [(int(p),) for p in planes]


def plane_output(segmenter: ModelSegmenter, image: Any, plane: int | None, *, diameter: Diameter = None,
                 invert: bool | None = None, tile: int = DEFAULT_TILE, cache: OutputCache | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[NetworkOutput, bool]:
    """(network output, was cached) of one plane (None: a 2D image) under the same rules and cache keys as :func:`segment_any`."""
    inputs = decide_inputs(segmenter, image, diameter, invert)
    index = () if plane is None else (plane,)
    stop_check = _stopper(should_stop)

    def compute() -> NetworkOutput:
        return segmenter.run_network(np.asarray(image[index] if index else image), diameter=inputs.diameter,
                                     invert=inputs.invert, tile=tile, on_tile=lambda done, total: stop_check())

    return _fetcher(cache, index, inputs, tile)(compute)


def segment_any(segmenter: Segmenter, image: Any, *, diameter: Diameter = None, invert: bool | None = None,
                tile: int = DEFAULT_TILE, decode: DecodeSettings | None = None, planes: Sequence[int] | None = None,
                cache: OutputCache | None = None, on_progress: Callable[[float], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> SegmentResult:
    """Labels of a 2D image, or of a stack/time series plane by plane (labels get the stack's shape).

    ``planes`` picks planes of a (Z,Y,X) stack (labels (len(planes),Y,X)). ``cache(key, compute)``
    returns (network output, was cached) for a plane's key. ``on_progress`` gets the finished
    fraction after every tile and plane; when ``should_stop()`` turns true, :class:`Stopped` is
    raised at the next tile. Lazily loaded arrays are read one plane at a time.
    """
    shape = tuple(int(n) for n in np.shape(image))
    stack, _ = plane_layout(shape)
    if math.prod(shape) == 0:
        raise InputError(f"image of shape {shape} is empty")
    inputs = decide_inputs(segmenter, image, diameter, invert)
    indices = _plane_indices(stack, planes, shape)
    results: list[SegmentResult] = []
    stop_check = _stopper(should_stop)
    for i, index in enumerate(indices):
        stop_check()

        def on_tile(done: int, total: int, i: int = i) -> None:
            stop_check()
            if on_progress is not None:
                on_progress((i + done / total) / len(indices))

        plane = np.asarray(image[index] if index else image)
        try:
            result = segmenter.segment_plane(plane, inputs, tile=tile, decode=decode,
                                             fetch=_fetcher(cache, index, inputs, tile), on_tile=on_tile)
        except InputError as exc:
            if not index:
                raise
            raise InputError(f"plane {', '.join(map(str, index))} of the image of shape {shape}: {exc}") from None
        results.append(result)
        if on_progress is not None:
            on_progress((i + 1) / len(indices))
    if not stack:
        return results[0]
    out_shape = (len(indices),) if planes is not None else stack
    labels = np.stack([r.labels for r in results]).reshape(out_shape + results[0].labels.shape)
    return SegmentResult(labels, sum(r.network_seconds for r in results), sum(r.decode_seconds for r in results),
                         None, inputs, all(r.cached for r in results))
