"""Segmenters: a bundled or user network, or the classical pipeline, behind one interface."""
from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .decode.classical import segment_classical
from .decode.mws import DecodeSettings
from .inference import DEFAULT_TILE, NetworkOutput, decode_output, run_network
from .io.checkpoint import CheckpointError, load_checkpoint
from .models import count_parameters
from .preprocess import InputError, check_finite

BUNDLED = {"teacher": "teacher.safetensors", "student": "student.safetensors"}
DEFAULT_TRAIN_DIAMETER = 28.0  # BBBC039: mean nucleus area ~600 px


@dataclass
class SegmentResult:
    """Labels for one image plus where the time went."""

    labels: np.ndarray
    network_seconds: float
    decode_seconds: float
    output: NetworkOutput | None = None


def bundled_path(name: str) -> Path:
    """Path of a checkpoint shipped inside the package."""
    return Path(str(resources.files("napari_graphkd") / "weights" / BUNDLED[name]))


def is_stack(image: np.ndarray) -> bool:
    """True for (Z,H,W) or (Z,H,W,C) stacks; (H,W,3|4) is one RGB(A) image, not a stack."""
    if image.ndim == 4:
        return True
    return image.ndim == 3 and not (image.shape[-1] in (3, 4) and image.shape[0] > 4)


class ModelSegmenter:
    """A network checkpoint plus its decoder settings (from the checkpoint metadata unless overridden)."""

    kind = "network"

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.model, self.metadata = load_checkpoint(self.path)
        self.name = name or self.path.stem
        self.decode_settings = DecodeSettings(**self.metadata.get("decode", {}))
        self.train_diameter = float(self.metadata.get("train_diameter", DEFAULT_TRAIN_DIAMETER))
        self.invert = bool(self.metadata.get("input", {}).get("invert", False))

    @property
    def parameters(self) -> int:
        """Number of network parameters."""
        return count_parameters(self.model)

    def describe(self) -> dict[str, Any]:
        """Metadata plus parameter count, for ``graphkd info`` and the widgets."""
        return dict(self.metadata, parameters=self.parameters, path=str(self.path))

    def run_network(self, image: np.ndarray, *, diameter: float | None = None, invert: bool | None = None,
                    tile: int = DEFAULT_TILE, on_tile: Callable[[int, int], None] | None = None) -> NetworkOutput:
        """Network output for one 2D image (cache it to re-decode with other settings)."""
        return run_network(self.model, image, invert=self.invert if invert is None else invert, diameter=diameter,
                           train_diameter=self.train_diameter, tile=tile, on_tile=on_tile)

    def segment(self, image: np.ndarray, *, diameter: float | None = None, invert: bool | None = None,
                tile: int = DEFAULT_TILE, decode: DecodeSettings | None = None) -> SegmentResult:
        """Labels of one 2D image."""
        out = self.run_network(image, diameter=diameter, invert=invert, tile=tile)
        labels, seconds = decode_output(out, decode or self.decode_settings)
        return SegmentResult(labels, out.seconds, seconds, out)


class ClassicalSegmenter:
    """Otsu + hole filling + distance-transform watershed (what a CellProfiler user runs today)."""

    kind = "classical"
    name = "classical"
    parameters = 0

    def describe(self) -> dict[str, Any]:
        """Parameters of the classical pipeline."""
        return {"name": "classical", "architecture": "otsu+watershed", "parameters": 0,
                "settings": {"sigma": 1.0, "min_distance": 9, "min_size": 30}}

    def segment(self, image: np.ndarray, *, diameter: float | None = None, invert: bool | None = None,
                tile: int = DEFAULT_TILE, decode: DecodeSettings | None = None) -> SegmentResult:
        """Labels of one 2D image; ``diameter`` scales the peak distance and minimum size."""
        from .inference import prepare_image

        gray = prepare_image(image, invert=bool(invert))
        factor = 1.0 if not diameter else float(diameter) / DEFAULT_TRAIN_DIAMETER
        start = time.perf_counter()
        labels = segment_classical(gray, min_distance=max(1, int(round(9 * factor))), min_size=max(1, int(round(30 * factor**2))))
        return SegmentResult(labels.astype(np.int32), 0.0, time.perf_counter() - start)


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


def segment_any(segmenter, image: np.ndarray, on_plane: Callable[[int, int], None] | None = None, **kwargs) -> SegmentResult:
    """Segment a 2D image or a stack/time series plane by plane (labels get the stack's shape)."""
    image = np.asarray(image)
    check_finite(image)
    if image.size == 0:
        raise InputError("image is empty")
    if not is_stack(image):
        return segmenter.segment(image, **kwargs)
    planes = []
    net = dec = 0.0
    for i, plane in enumerate(image):
        result = segmenter.segment(plane, **kwargs)
        planes.append(result.labels)
        net, dec = net + result.network_seconds, dec + result.decode_seconds
        if on_plane is not None:
            on_plane(i + 1, len(image))
    return SegmentResult(np.stack(planes), net, dec)
