"""Choices a viewer makes about large images: when to take the chunked path, and which box is on screen."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Planes above this many pixels go through the chunked path even when they are in memory (about 4k x 4k).
CHUNKED_PIXELS = 4096 * 4096


def full_resolution(data: Any) -> Any:
    """The full-resolution array of a layer's data (the first level of a multiscale sequence)."""
    return data[0] if isinstance(data, Sequence) else data


def wants_chunked(data: Any, max_pixels: int = CHUNKED_PIXELS) -> bool:
    """True for lazy data (dask, zarr, multiscale) or planes larger than ``max_pixels``: segment chunk by chunk."""
    if isinstance(data, Sequence) or not isinstance(data, np.ndarray):
        return True
    return int(np.prod(data.shape[-2:])) > max_pixels


def view_box(center: Sequence[float], zoom: float, canvas: Sequence[float], shape: Sequence[int],
             scale: Sequence[float] = (1.0, 1.0), translate: Sequence[float] = (0.0, 0.0)) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) data pixels of a (H, W) plane visible in a (h, w) px canvas at world ``center`` and ``zoom``.

    ``zoom`` is screen pixels per world unit; ``scale``/``translate`` place the plane in the world. The
    box is clipped to the plane; an empty box means the plane is off screen.
    """
    box = []
    for axis in range(2):
        half = canvas[axis] / (2.0 * zoom)
        lo = (center[axis] - half - translate[axis]) / scale[axis]
        hi = (center[axis] + half - translate[axis]) / scale[axis]
        start = int(np.clip(np.floor(lo), 0, shape[axis]))
        box += [start, max(start, int(np.clip(np.ceil(hi), 0, shape[axis])))]
    return box[0], box[1], box[2], box[3]
