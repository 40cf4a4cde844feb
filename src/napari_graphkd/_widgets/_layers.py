"""Layer glue: which planes of an image layer to segment, and where result layers go in the world.

Convention: a result covers either a whole 2D image, a whole stack, or one plane of a stack. A
one-plane result is a (1,H,W) layer translated to its plane, so it shows only on that plane and
never needs a stack-sized array of zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from napari.layers import Image, Layer

from ..preprocess import InputError

KEY = "graphkd"  # layer.metadata key holding provenance
CREATED_BY = "napari-graphkd Segment widget"  # provenance["created_by"] of segmentation results


def check_image_layer(layer: Image | None) -> None:
    """Raise InputError unless ``layer`` is a single-scale 2D image or 3D stack/time series."""
    if layer is None:
        raise InputError("choose an Image layer first")
    if layer.multiscale:
        raise InputError(f"{layer.name!r} is multiscale; open its full-resolution level as a plain image")
    if layer.ndim not in (2, 3):
        raise InputError(f"{layer.name!r} has {layer.ndim} dimensions; expected a 2D image or a stack/time series of 2D planes")


def current_plane(viewer, layer: Layer) -> int:
    """Index (along the layer's first axis) of the plane the viewer shows."""
    z = int(round(float(layer.world_to_data(viewer.dims.point)[0])))
    return int(np.clip(z, 0, layer.data.shape[0] - 1))


def planes_to_run(viewer, layer: Image, all_planes: bool) -> list[int | None]:
    """[None] for a 2D image, else every plane or just the current one."""
    if layer.ndim == 2:
        return [None]
    return list(range(layer.data.shape[0])) if all_planes else [current_plane(viewer, layer)]


def plane_data(data, plane: int | None) -> np.ndarray:
    """One 2D (or RGB) plane of a layer's data as numpy (reads lazily-backed arrays one plane at a time)."""
    return np.asarray(data if plane is None else data[plane])


def stack_planes(planes: list[np.ndarray], plane_ids: list[int | None]) -> np.ndarray:
    """Result array for ``plane_ids``: the plane itself for 2D images, else a (Z,H,W) stack."""
    return planes[0] if plane_ids == [None] else np.stack(planes)


@dataclass(frozen=True)
class Placement:
    """World placement of a result layer (scale, translate) matching its image's planes."""

    scale: tuple[float, ...]
    translate: tuple[float, ...]

    def kwargs(self, leading: int = 0) -> dict:
        """Layer keyword arguments, with ``leading`` extra unscaled axes in front (e.g. offsets)."""
        return {"scale": (1.0,) * leading + self.scale, "translate": (0.0,) * leading + self.translate}


def placement(layer: Layer, planes: list[int | None]) -> Placement:
    """Placement of a result of ``layer`` covering ``planes`` (one plane of a stack is shifted onto it)."""
    scale = tuple(float(s) for s in layer.scale)
    translate = [float(t) for t in layer.translate]
    if len(planes) == 1 and planes[0] is not None:
        translate[0] += planes[0] * scale[0]
    return Placement(scale, tuple(translate))


def with_plane_axis(coords: np.ndarray, stacked: bool) -> np.ndarray:
    """Coordinates (...,2) given a leading zero plane coordinate (...,3) when the layer is a stack."""
    if not stacked:
        return coords
    return np.concatenate([np.zeros(coords.shape[:-1] + (1,)), coords], axis=-1)


def find_layer(viewer, layer_id: str) -> Layer | None:
    """The viewer layer whose unique id (as a string) is ``layer_id``."""
    return next((layer for layer in viewer.layers if str(layer.unique_id) == layer_id), None)


def provenance(layer: Layer) -> dict:
    """The napari-graphkd provenance of a layer ({} for layers we did not make)."""
    return layer.metadata.get(KEY, {}) if isinstance(layer.metadata, dict) else {}
