"""Running a network on an image: input rules, object-size rescaling, seamless tiling, decoding.

One code path serves the CLI, the benchmarks and the napari widgets. The network output is kept
(:class:`NetworkOutput`) so that decoder settings can be changed without re-running the network.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import ndimage as ndi

from .affinity import OFFSETS, embedding_affinities
from .decode.mws import DecodeSettings, decode
from .models import EmbeddingUNet
from .preprocess import InputError, normalize, to_grayscale

MIN_SIDE = 16
DEFAULT_TILE = 1024
TILE_OVERLAP = 64


@dataclass
class NetworkOutput:
    """Network output for one 2D image, at the (possibly rescaled) working size."""

    embedding: np.ndarray  # (C,h,w) float32
    foreground: np.ndarray | None  # (h,w) probability
    image_shape: tuple[int, int]  # original (H,W) of the input
    scale: float  # working size / original size
    seconds: float

    def affinities(self) -> np.ndarray:
        """Cosine affinities (K,h,w) of the embedding at the standard offsets."""
        return embedding_affinities(torch.from_numpy(self.embedding)[None], OFFSETS)[0].numpy()


def prepare_image(image: np.ndarray, invert: bool = False) -> np.ndarray:
    """Validated, grayscale, robustly normalised float32 2D image."""
    gray = to_grayscale(image, invert=invert)
    if min(gray.shape) < MIN_SIDE:
        raise InputError(f"image is too small ({gray.shape[0]}x{gray.shape[1]}); need at least {MIN_SIDE} px per side")
    return normalize(gray)


def rescale_factor(diameter: float | None, train_diameter: float) -> float:
    """Factor that brings objects of ``diameter`` px to the training diameter (1 when unset)."""
    if diameter is None or diameter <= 0:
        return 1.0
    return float(train_diameter) / float(diameter)


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start positions of tiles of length ``tile`` covering ``n`` with at least ``overlap`` shared px."""
    if n <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(starts))


@torch.inference_mode()
def _network(model: EmbeddingUNet, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the network on one whole normalised 2D image."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if model.config.in_channels != 1:
        x = x.repeat(1, model.config.in_channels, 1, 1)
    emb, fg = model(x)
    fg_np = torch.sigmoid(fg[0, 0]).numpy() if fg is not None else None
    return emb[0].numpy(), fg_np


def tiled_network(
    model: EmbeddingUNet,
    image: np.ndarray,
    tile: int = DEFAULT_TILE,
    overlap: int = TILE_OVERLAP,
    on_tile: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Network output of a large image from overlapping tiles, each contributing only its centre.

    Every output pixel comes from a tile in which it lies at least ``overlap/2`` px from an inner
    tile edge, so the stitched embedding has no seams; decoding then runs on the whole image, so
    no nucleus is split at a tile border.
    """
    h, w = image.shape
    if tile < 2 * overlap:
        raise InputError(f"tile size {tile} must be at least twice the overlap ({overlap})")
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    emb = fg = None
    n_tiles, done = len(ys) * len(xs), 0
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            e, f = _network(model, image[y : y + tile, x : x + tile])
            if emb is None:
                emb = np.empty((e.shape[0], h, w), dtype=np.float32)
                fg = np.empty((h, w), dtype=np.float32) if f is not None else None
            th, tw = e.shape[1:]
            # keep the centre: cut half the overlap on every side that borders another tile
            y0 = 0 if iy == 0 else (ys[iy - 1] + tile - y) // 2 + 0
            x0 = 0 if ix == 0 else (xs[ix - 1] + tile - x) // 2 + 0
            y1 = th if iy == len(ys) - 1 else th - (y + th - ys[iy + 1]) // 2
            x1 = tw if ix == len(xs) - 1 else tw - (x + tw - xs[ix + 1]) // 2
            emb[:, y + y0 : y + y1, x + x0 : x + x1] = e[:, y0:y1, x0:x1]
            if fg is not None:
                fg[y + y0 : y + y1, x + x0 : x + x1] = f[y0:y1, x0:x1]
            done += 1
            if on_tile is not None:
                on_tile(done, n_tiles)
    return emb, fg


def run_network(
    model: EmbeddingUNet,
    image: np.ndarray,
    *,
    invert: bool = False,
    diameter: float | None = None,
    train_diameter: float = 28.0,
    tile: int = DEFAULT_TILE,
    on_tile: Callable[[int, int], None] | None = None,
) -> NetworkOutput:
    """Network output for a raw 2D image (any dtype, gray/RGB), rescaled to the training object size."""
    prepared = prepare_image(image, invert=invert)
    scale = rescale_factor(diameter, train_diameter)
    if scale != 1.0:
        prepared = ndi.zoom(prepared, scale, order=1)
        if min(prepared.shape) < MIN_SIDE:
            raise InputError(f"image becomes too small ({prepared.shape}) after rescaling to diameter {diameter}")
    start = time.perf_counter()
    emb, fg = tiled_network(model, prepared, tile=tile, on_tile=on_tile)
    return NetworkOutput(emb, fg, tuple(image.shape[:2]), scale, time.perf_counter() - start)


def decode_output(output: NetworkOutput, settings: DecodeSettings = DecodeSettings()) -> tuple[np.ndarray, float]:
    """Instance labels at the original image size, and the decode time (affinities + MWS + clean-up)."""
    start = time.perf_counter()
    labels = decode(output.affinities(), output.foreground, settings)
    if labels.shape != output.image_shape:
        zoom = [o / s for o, s in zip(output.image_shape, labels.shape)]
        labels = ndi.zoom(labels, zoom, order=0, grid_mode=True, mode="nearest")
    return labels.astype(np.int32), time.perf_counter() - start
