"""Segmenters (a bundled or user network, or the classical pipeline) and the one pipeline every caller runs.

:func:`segment_any` is that pipeline (CLI, widgets, fine-tune scoring, benchmarks): the image's
shape decides its planes (:func:`napari_graphkd.planes.plane_layout`, the one stack rule), the
input rules decide the channel, inversion and nucleus diameter once per image (:func:`decide_inputs`;
``auto`` by default: hematoxylin for stained RGB, inversion for dark nuclei, the diameter measured on
a first segmentation), then each plane is prepared at the model's scale, run through the network
(outputs optionally cached) and decoded. A 3D model (checkpoint config ``ndim=3``) takes a (Z,Y,X)
volume through the same steps as one unit: normalised as a whole, rescaled per axis to the voxel
size it was trained at (:func:`volume_scale`), run in overlapping 3D tiles and decoded in 3D.
Progress is reported per tile and per plane; a stop request ends the run at the next tile.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Hashable, Protocol, Sequence

import numpy as np

from .affinity import offsets_for
from .data import image_polarity
from .decode.classical import ClassicalSettings, segment_classical
from .decode.mws import DecodeSettings
from .decode.policy import decode_output
from .inference import (DEFAULT_TILE, MAX_WORKING_PIXELS, MAX_WORKING_VOXELS, MIN_SIDE, TRAIN_DIAMETER, NetworkOutput,
                        check_volume, network_output, prepare_image, rescale_factor, working_image, working_shape,
                        working_volume)
from .io.checkpoint import CheckpointError, load_checkpoint
from .models import EmbeddingUNet, count_parameters
from .planes import plane_layout
from .preprocess import AUTO, CHANNEL_MODES, InputError, channel_image, detect_polarity, is_stained_rgb
from .sizing import BOUNDS, MAX_PASSES, estimate_diameter

# teacher: the generalist (BBBC039 + DSB2018 fluorescence + DSB2018 bright-field); student: distilled from it (GRD).
# teacher-bbbc039 / student-bbbc039: the BBBC039 specialists, best on BBBC039-like images (README).
BUNDLED = {"teacher": "teacher.safetensors", "student": "student.safetensors",
           "teacher-bbbc039": "teacher-bbbc039.safetensors", "student-bbbc039": "student-bbbc039.safetensors"}

Diameter = float | str | None  # px, AUTO, or None (as trained)
Invert = bool | str | None  # AUTO, or None (the model's default)
VoxelSize = tuple[float, float, float]  # (z, y, x) voxel size of a volume, any one unit
Fetch = Callable[[Callable[[], NetworkOutput]], tuple[NetworkOutput, bool]]
OutputCache = Callable[[Hashable, Callable[[], NetworkOutput]], tuple[NetworkOutput, bool]]
OnTile = Callable[[int, int], None]


class Stopped(Exception):
    """The caller's ``should_stop`` turned true: the run ended early."""


@dataclass(frozen=True)
class RunSettings:
    """How an image is run: nucleus diameter (px, ``auto``, or None = as trained), inversion (``auto``, or None = the
    model's), input channel (``auto``, ``luminance`` or ``hematoxylin``), tile size."""

    diameter: Diameter = AUTO
    invert: Invert = AUTO
    channel: str = AUTO
    tile: int = DEFAULT_TILE
    voxel_size: VoxelSize | None = None  # volumes of a 3D model: (z, y, x); None = as the model was trained

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`segment_any`."""
        out = {"diameter": self.diameter, "invert": self.invert, "channel": self.channel, "tile": self.tile}
        return out if self.voxel_size is None else dict(out, voxel_size=self.voxel_size)


AS_TRAINED = RunSettings(diameter=None, invert=None, channel="luminance")  # no automatic rule: the model's own scale and polarity


@dataclass(frozen=True)
class InputDecision:
    """What the input rules chose for one image: the diameter it is rescaled from, the inversion, the channel.

    ``estimated`` names what was chosen automatically; it is not part of equality, so a decision
    keys the same cached network output whether it was given or estimated.
    """

    diameter: float | None  # nucleus diameter (px) in the image; None: as the model was trained
    invert: bool
    channel: str = "luminance"
    estimated: tuple[str, ...] = field(default=(), compare=False)
    voxel_size: VoxelSize | None = None  # a volume's (z, y, x) voxel size; None: 2D, or as the model was trained

    def describe(self) -> str:
        """Short text for reports, e.g. ``41 px (auto), inverted (auto), hematoxylin (auto)``."""
        def tag(name: str) -> str:
            return " (auto)" if name in self.estimated else ""

        size = "as trained" if self.diameter is None else f"{self.diameter:.3g} px"
        parts = [size + tag("diameter"), ("inverted" if self.invert else "not inverted") + tag("invert"),
                 self.channel + tag("channel")]
        if self.voxel_size is not None:
            parts.append("voxel " + ":".join(f"{v:g}" for v in self.voxel_size) + " (z:y:x)")
        return ", ".join(parts)

    def run_settings(self, tile: int = DEFAULT_TILE) -> RunSettings:
        """The same choices given explicitly (re-running them estimates nothing)."""
        return RunSettings(self.diameter, self.invert, self.channel, tile, self.voxel_size)

    def to_dict(self) -> dict:
        """Plain dict for layer metadata and JSON reports."""
        out = {"diameter": self.diameter, "invert": self.invert, "channel": self.channel, "estimated": list(self.estimated)}
        return out if self.voxel_size is None else dict(out, voxel_size=list(self.voxel_size))


@dataclass
class SegmentResult:
    """Labels of one image (or plane) plus where the time went and what the input rules chose."""

    labels: np.ndarray
    network_seconds: float
    decode_seconds: float
    output: NetworkOutput | None = None  # the network output of a 2D image or volume (None for stacks and classical)
    inputs: InputDecision | None = None
    cached: bool = False  # every network output came from the cache
    volume: bool = False  # the labels are one 3D segmentation (ids span planes), not a stack of 2D ones

    @property
    def objects(self) -> int:
        """Number of objects: of the volume, or summed over the planes of a stack."""
        return count_objects(self.labels, self.volume)


class Segmenter(Protocol):
    """What the pipeline needs of a model: its defaults, a description, and one plane's labels."""

    kind: str  # "network" or "classical"
    name: str
    ndim: int  # 2: planes (a stack plane by plane); 3: (Z,Y,X) volumes as a whole
    train_diameter: float  # nucleus diameter (px) its settings were made for
    invert: bool  # default inversion
    size_hint: float | None  # where the automatic diameter starts (px); None: START training diameters
    decode_settings: DecodeSettings | None

    @property
    def parameters(self) -> int: ...

    def describe(self) -> dict[str, Any]: ...

    def segment_plane(self, plane: np.ndarray, inputs: InputDecision, *, tile: int, decode: DecodeSettings | None,
                      fetch: Fetch, on_tile: OnTile | None) -> SegmentResult: ...


def count_objects(labels: np.ndarray, volume: bool = False) -> int:
    """Objects in a label image or volume; for a stack (a series of volumes), the sum over its planes (volumes):
    ids may repeat across them."""
    planes = np.asarray(labels).reshape(-1, *np.shape(labels)[-3 if volume else -2:])
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


def check_invert(invert: Invert) -> bool | str | None:
    """``auto``, None (the model's default) or a bool; InputError otherwise."""
    if invert is None or invert == AUTO or isinstance(invert, (bool, np.bool_)):
        return invert if invert is None or invert == AUTO else bool(invert)
    raise InputError(f"invert must be true, false or {AUTO!r}, got {invert!r}")


def check_channel(channel: str) -> str:
    """``auto`` or one of CHANNEL_MODES; InputError otherwise."""
    if channel != AUTO and channel not in CHANNEL_MODES:
        raise InputError(f"unknown input channel {channel!r}; choose {', '.join(CHANNEL_MODES)} or {AUTO}")
    return channel


def check_voxel_size(voxel_size: Any) -> VoxelSize | None:
    """A volume's voxel size as three positive finite floats (z, y, x), or None; InputError otherwise."""
    if voxel_size is None:
        return None
    try:
        values = tuple(float(v) for v in voxel_size)
    except (TypeError, ValueError):
        raise InputError(f"voxel size {voxel_size!r} is not three numbers (z, y, x)") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"voxel size must be three positive numbers (z, y, x), got {voxel_size!r}")
    return values


def volume_scale(diameter: float | None, train_diameter: float, voxel_size: VoxelSize | None,
                 train_voxel_size: VoxelSize | None) -> tuple[float, float, float]:
    """Per-axis (z, y, x) factor that brings a volume to a 3D model's scale.

    In-plane, objects of ``diameter`` px go to the training diameter (1 when unset); every axis
    is then stretched so the voxels have the proportions (anisotropy) of the training voxels:
    only ratios count, so the two voxel sizes need no common unit. A model without a recorded
    voxel size was trained on isotropic voxels; no ``voxel_size`` means the model's own.
    """
    base = rescale_factor(diameter, train_diameter)
    if voxel_size is None:
        return (base,) * 3
    model = train_voxel_size or (1.0, 1.0, 1.0)
    return tuple(base * (v / voxel_size[2]) / (m / model[2]) for v, m in zip(voxel_size, model))


def volume_mode(segmenter: Segmenter, shape: tuple[int, ...], volume: bool | None) -> bool:
    """Whether an image of ``shape`` runs as one volume: yes for a 3D model, refused when the request and model differ."""
    ndim = getattr(segmenter, "ndim", 2)
    if ndim == 3:
        if volume is False:
            raise InputError(f"{segmenter.name} is a 3D model: it segments (Z,Y,X) volumes as a whole, not plane by plane")
        if len(shape) == 4 and len(plane_layout(shape)[0]) == 2:  # (T,Z,Y,X): a series of volumes, one at a time
            check_volume(shape[1:])
        else:
            check_volume(shape)
        return True
    if volume:
        raise InputError(f"{segmenter.name} is a 2D model: it segments a stack plane by plane (drop --3d / volume), "
                         "or choose a 3D model to segment it as a volume")
    return False


def diameter_range(segmenter: Segmenter, plane_shape: tuple[int, int]) -> tuple[float, float]:
    """Smallest and largest nucleus diameter (px) a plane can be rescaled from: within the estimate's BOUNDS,
    at most MAX_WORKING_PIXELS once rescaled, and at least MIN_SIDE (+1) px per side."""
    h, w = plane_shape
    train = segmenter.train_diameter
    lo = max(BOUNDS[0] * train, train * math.sqrt(h * w / MAX_WORKING_PIXELS))
    hi = max(min(BOUNDS[1] * train, train * min(h, w) / (MIN_SIDE + 1)), lo)
    return lo, hi


def _decide_volume(segmenter: Segmenter, volume: Any, diameter: float | str | None, invert: bool | str | None,
                   channel: str, voxel_size: Any) -> InputDecision:
    """The input rules of a (Z,Y,X) volume for a 3D model: gray, inverted as asked or as its middle plane says,
    rescaled in-plane only for a given diameter (``auto``: as trained), per axis to the model's voxel proportions."""
    shape = tuple(np.shape(volume))
    check_volume(shape)
    voxel = check_voxel_size(voxel_size)
    if channel not in (AUTO, "luminance"):
        raise InputError(f"volumes are read as gray values; the {channel} channel applies to 2D RGB images")
    estimated = ["channel"] if channel == AUTO else []
    size = None if diameter == AUTO else diameter
    scale = volume_scale(size, segmenter.train_diameter, voxel, getattr(segmenter, "voxel_size", None))
    big = working_shape(shape, scale)
    if math.prod(big) > MAX_WORKING_VOXELS:
        raise InputError(f"the {'x'.join(map(str, shape))} volume would be rescaled to {'x'.join(map(str, big))} voxels "
                         f"(more than {MAX_WORKING_VOXELS:,}); check the voxel size and diameter, segment a crop, or segment "
                         "it in 3D chunks (graphkd segment --chunked; napari_graphkd.large.segment_large)")
    if invert == AUTO:
        invert = image_polarity(volume)
        estimated.append("invert")
    invert = segmenter.invert if invert is None else invert
    return InputDecision(size, invert, "luminance", tuple(estimated), voxel)


def _decide(segmenter: Segmenter, image: Any, diameter: Diameter, invert: Invert, channel: str, index: tuple[int, ...],
            tile: int, decode: DecodeSettings | None, cache: OutputCache | None,
            on_progress: Callable[[float], None] | None,
            voxel_size: Any = None) -> tuple[InputDecision, SegmentResult | None]:
    """The input rules of an image decided on its plane ``index``, and that plane's segmentation when the diameter was
    estimated (its times sum every pass), else None. ``on_progress`` gets the fraction of the estimate done, per tile.
    A volume given to a 3D model is decided as a whole (:func:`_decide_volume`)."""
    value, invert, channel = check_diameter(diameter), check_invert(invert), check_channel(channel)
    if getattr(segmenter, "ndim", 2) == 3:
        return _decide_volume(segmenter, image[index] if index else image, value, invert, channel, voxel_size), None
    if voxel_size is not None:
        raise InputError(f"a voxel size applies to volumes segmented by a 3D model; {segmenter.name} segments 2D planes")
    h, w = plane_layout(np.shape(image))[1][:2]
    if value not in (None, AUTO):
        scale = rescale_factor(value, segmenter.train_diameter)
        big = working_shape((h, w), scale)
        if big[0] * big[1] > MAX_WORKING_PIXELS:
            raise InputError(f"nucleus diameter {value:g} px would rescale each {h}x{w} plane to {big[0]}x{big[1]} px "
                             f"(more than {MAX_WORKING_PIXELS:,}); give the diameter in pixels of this image")
    if AUTO not in (value, invert, channel):
        return InputDecision(value, segmenter.invert if invert is None else invert, channel), None
    plane = np.asarray(image[index] if index else image)
    estimated = []
    if channel == AUTO:
        channel = "hematoxylin" if is_stained_rgb(plane) else "luminance"
        estimated.append("channel")
    if invert == AUTO:
        invert = detect_polarity(channel_image(plane, channel))
        estimated.append("invert")
    invert = segmenter.invert if invert is None else invert
    if value != AUTO:
        return InputDecision(value, invert, channel, tuple(estimated)), None
    spent = [0.0, 0.0, 0]  # network s, decode s, passes

    def on_tile(done: int, total: int) -> None:
        if on_progress is not None:  # passes after the first are rarer: the estimate's fraction only grows
            on_progress(min((spent[2] + done / total) / (MAX_PASSES + 1), 1.0))

    def segment_at(d: float | None) -> SegmentResult:
        trial = InputDecision(d, invert, channel)  # the cache key the final decision reuses
        result = segmenter.segment_plane(plane, trial, tile=tile, decode=decode,
                                         fetch=_fetcher(cache, index, trial, tile), on_tile=on_tile)
        spent[0], spent[1], spent[2] = spent[0] + result.network_seconds, spent[1] + result.decode_seconds, spent[2] + 1
        return result

    estimate = estimate_diameter(segment_at, segmenter.train_diameter, start=segmenter.size_hint,
                                 bounds=diameter_range(segmenter, (h, w)))
    decision = InputDecision(estimate.diameter, invert, channel, (*estimated, "diameter"))
    return decision, replace(estimate.result, inputs=decision, network_seconds=spent[0], decode_seconds=spent[1])


def decide_inputs(segmenter: Segmenter, image: Any, diameter: Diameter = AUTO, invert: Invert = AUTO,
                  channel: str = AUTO, *, plane: int | None = None, tile: int = DEFAULT_TILE,
                  cache: OutputCache | None = None, voxel_size: Any = None) -> InputDecision:
    """The input rules of one image (2D or stack, decided on ``plane`` or the first): channel, inversion, nucleus diameter.

    ``auto`` fields are chosen from the image: the hematoxylin channel for stained RGB
    (:func:`~napari_graphkd.preprocess.is_stained_rgb`), inversion for dark nuclei on a bright
    background (:func:`~napari_graphkd.preprocess.detect_polarity`), the diameter measured on the
    segmenter's own first passes (:func:`~napari_graphkd.sizing.estimate_diameter`; None when no
    consistent size exists). Refuses a diameter whose rescaled planes would exceed MAX_WORKING_PIXELS.
    A 3D model decides for the whole volume, with its ``voxel_size`` (z, y, x).
    """
    stack, _ = plane_layout(np.shape(image))
    index = (plane,) if plane is not None else (0,) * len(stack)
    if getattr(segmenter, "ndim", 2) == 3:  # a volume is decided whole; a (T,Z,Y,X) series on one of its volumes
        index = () if np.ndim(image) == 3 else (plane or 0,)
    return _decide(segmenter, image, diameter, invert, channel, index, tile, None, cache, None, voxel_size)[0]


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
        # a fine-tuned model knows its user's nucleus size (px): the automatic diameter's first pass starts there
        self.size_hint = self.metadata.get("finetune", {}).get("diameter")
        self.ndim = int(getattr(self.model.config, "ndim", 2))
        voxel = self.metadata.get("voxel_size")
        self.voxel_size = None if voxel is None else check_voxel_size(voxel)  # (z, y, x) of its training volumes
        offsets = self.metadata.get("offsets") if self.ndim == 3 else None
        self.offsets = None if offsets is None else tuple(tuple(int(o) for o in off) for off in offsets)
        if self.ndim == 3 and self.offsets is None:
            voxel = self.voxel_size or (1.0, 1.0, 1.0)
            self.offsets = offsets_for(3, voxel[0] / voxel[2])

    @property
    def parameters(self) -> int:
        """Number of network parameters."""
        return count_parameters(self.model)

    def describe(self) -> dict[str, Any]:
        """Metadata plus parameter count and dimensionality, for ``graphkd info`` and the widgets."""
        return dict(self.metadata, parameters=self.parameters, ndim=self.ndim,
                    path=None if self.path is None else str(self.path))

    def run_network(self, image: np.ndarray, *, diameter: float | None = None, invert: bool | None = None,
                    channel: str = "luminance", tile: int = DEFAULT_TILE, on_tile: OnTile | None = None,
                    voxel_size: VoxelSize | None = None) -> NetworkOutput:
        """Network output for one 2D plane, or one (Z,Y,X) volume of a 3D model (cache it to re-decode with other
        settings); its time includes preparation."""
        start = time.perf_counter()
        invert = self.invert if invert is None else invert
        if self.ndim == 3:
            scale = volume_scale(diameter, self.train_diameter, voxel_size, self.voxel_size)
            working = working_volume(image, invert=invert, scale=scale)
            output = network_output(self.model, working, tuple(np.shape(image)), scale, tile, on_tile, self.offsets)
            output.seconds = time.perf_counter() - start
            return output
        scale = rescale_factor(diameter, self.train_diameter)
        working = working_image(channel_image(image, channel), invert=invert, scale=scale)
        output = network_output(self.model, working, tuple(np.shape(image)[:2]), scale, tile, on_tile)
        output.seconds = time.perf_counter() - start
        return output

    def segment_plane(self, plane: np.ndarray, inputs: InputDecision, *, tile: int = DEFAULT_TILE,
                      decode: DecodeSettings | None = None, fetch: Fetch | None = None,
                      on_tile: OnTile | None = None) -> SegmentResult:
        """Labels of one 2D plane (a 3D model: one volume): the network output (from ``fetch``'s cache or computed), decoded."""
        def compute() -> NetworkOutput:
            return self.run_network(plane, diameter=inputs.diameter, invert=inputs.invert, channel=inputs.channel,
                                    tile=tile, on_tile=on_tile, voxel_size=inputs.voxel_size)

        output, cached = fetch(compute) if fetch is not None else (compute(), False)
        labels, seconds = decode_output(output, decode or self.decode_settings, output.offsets)  # a 3D model's own offsets
        return SegmentResult(labels, output.seconds, seconds, output, inputs, cached, volume=self.ndim == 3)


class ClassicalSegmenter:
    """Otsu + hole filling + distance-transform watershed (what a CellProfiler user runs today)."""

    kind = "classical"
    name = "classical"
    ndim = 2
    parameters = 0
    train_diameter = TRAIN_DIAMETER  # its settings are in pixels at the networks' training diameter
    invert = False
    size_hint = None
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
        gray = prepare_image(channel_image(plane, inputs.channel), invert=inputs.invert)
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


def plane_output(segmenter: ModelSegmenter, image: Any, plane: int | None, *, diameter: Diameter = AUTO,
                 invert: Invert = AUTO, channel: str = AUTO, tile: int = DEFAULT_TILE, cache: OutputCache | None = None,
                 should_stop: Callable[[], bool] | None = None, voxel_size: Any = None) -> tuple[NetworkOutput, bool]:
    """(network output, was cached) of one plane (None: a 2D image, or the volume of a 3D model) under the same rules
    and cache keys as :func:`segment_any`."""
    if segmenter.ndim == 3 and plane is not None and np.ndim(image) == 3:
        raise InputError(f"{segmenter.name} is a 3D model: its output covers the whole volume, not plane {plane}")
    inputs = decide_inputs(segmenter, image, diameter, invert, channel, plane=plane, tile=tile, cache=cache,
                           voxel_size=voxel_size)
    index = () if plane is None else (plane,)
    stop_check = _stopper(should_stop)

    def compute() -> NetworkOutput:
        return segmenter.run_network(np.asarray(image[index] if index else image), diameter=inputs.diameter,
                                     invert=inputs.invert, channel=inputs.channel, tile=tile,
                                     on_tile=lambda done, total: stop_check(), voxel_size=inputs.voxel_size)

    return _fetcher(cache, index, inputs, tile)(compute)


def segment_any(segmenter: Segmenter, image: Any, *, diameter: Diameter = AUTO, invert: Invert = AUTO,
                channel: str = AUTO, tile: int = DEFAULT_TILE, decode: DecodeSettings | None = None,
                planes: Sequence[int] | None = None, cache: OutputCache | None = None,
                on_progress: Callable[[float], None] | None = None,
                should_stop: Callable[[], bool] | None = None, volume: bool | None = None,
                voxel_size: Any = None) -> SegmentResult:
    """Labels of a 2D image, or of a stack/time series plane by plane (labels get the stack's shape), or of a
    (Z,Y,X) volume as one 3D segmentation when the model is 3D (a (T,Z,Y,X) series: volume by volume).

    ``volume`` (None: decided by the model) asks for one or the other and is refused when the
    model cannot do it (:func:`volume_mode`); ``voxel_size`` (z, y, x) is the volume's anisotropy
    (None: the model's own), see :func:`volume_scale`.

    The input rules (:func:`decide_inputs`) are decided once, on the first plane to run; an
    estimated diameter's last pass is that plane's result. ``planes`` picks planes of a (Z,Y,X)
    stack (labels (len(planes),Y,X)). ``cache(key, compute)`` returns (network output, was cached)
    for a plane's key. ``on_progress`` gets the finished fraction after every tile and plane; when
    ``should_stop()`` turns true, :class:`Stopped` is raised at the next tile. Lazily loaded arrays
    are read one plane at a time.
    """
    shape = tuple(int(n) for n in np.shape(image))
    stack, _ = plane_layout(shape)
    if math.prod(shape) == 0:
        raise InputError(f"image of shape {shape} is empty")
    as_volume = volume_mode(segmenter, shape, volume)
    if as_volume and planes is not None:
        raise InputError(f"{segmenter.name} is a 3D model: it segments the whole volume, not chosen planes")
    if as_volume:
        indices = [()] if len(shape) == 3 else [(t,) for t in range(shape[0])]
    else:
        indices = _plane_indices(stack, planes, shape)
    results: list[SegmentResult] = []
    stop_check = _stopper(should_stop)

    def estimate_progress(fraction: float) -> None:
        stop_check()
        if on_progress is not None:
            on_progress(fraction / len(indices))

    inputs, first = _decide(segmenter, image, diameter, invert, channel, indices[0], tile, decode, cache, estimate_progress,
                            voxel_size)
    for i, index in enumerate(indices):
        stop_check()

        def on_tile(done: int, total: int, i: int = i) -> None:
            stop_check()
            if on_progress is not None:
                on_progress((i + done / total) / len(indices))

        plane = np.asarray(image[index] if index else image)
        try:
            if i == 0 and first is not None:
                result = first
            else:
                result = segmenter.segment_plane(plane, inputs, tile=tile, decode=decode,
                                                 fetch=_fetcher(cache, index, inputs, tile), on_tile=on_tile)
        except InputError as exc:
            if not index:
                raise
            unit = "volume" if as_volume else "plane"
            raise InputError(f"{unit} {', '.join(map(str, index))} of the image of shape {shape}: {exc}") from None
        results.append(result)
        if on_progress is not None:
            on_progress((i + 1) / len(indices))
    if not stack or indices == [()]:
        return results[0]
    out_shape = (len(indices),) if planes is not None or as_volume else stack
    labels = np.stack([r.labels for r in results]).reshape(out_shape + results[0].labels.shape)
    return SegmentResult(labels, sum(r.network_seconds for r in results), sum(r.decode_seconds for r in results),
                         None, inputs, all(r.cached for r in results), volume=as_volume)
