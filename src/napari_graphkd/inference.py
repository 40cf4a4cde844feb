"""Running a network on an image: preparation at the model's scale, seamless tiling, the network output.

:func:`working_image` is the one preparation (input rules, normalisation, object-size rescaling)
every caller uses; :func:`network_output` runs a network on it. The output is kept
(:class:`NetworkOutput`) so that decoder settings can be changed without re-running the network;
:mod:`napari_graphkd.decode.policy` turns it into labels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import ndimage as ndi

from .affinity import OFFSETS, embedding_affinities
from .models import EmbeddingUNet
from .preprocess import MAX_WORKING_PIXELS, InputError, grayscale, normalize

TRAIN_DIAMETER = 28.0  # nucleus diameter (px) the bundled models were trained at (BBBC039: mean area ~600 px)
MIN_SIDE = 16
DEFAULT_TILE = 1024
TILE_OVERLAP = 64


@dataclass
class NetworkOutput:
    """Network output for one 2D image at the network's native resolution (cache it to re-decode)."""

    embedding: np.ndarray  # (C,h,w) float32 at 1/stride of the working size
    foreground: np.ndarray | None  # (h,w) probability, same grid
    image_shape: tuple[int, int]  # original (H,W) of the input
    scale: float  # working size / original size (object-size rescaling)
    seconds: float  # input preparation + network
    stride: int = 1
    working_shape: tuple[int, int] | None = None  # size the network saw; default: image_shape

    @property
    def full_shape(self) -> tuple[int, int]:
        """Size of the network's input (after rescaling), where full-resolution decoding happens."""
        return tuple(self.working_shape or self.image_shape)

    def full_embedding(self) -> np.ndarray:
        """Embedding bilinearly upsampled to the input size (what the network's ``forward`` returns)."""
        return _upsample(self.embedding, self.stride, self.full_shape)

    def full_foreground(self) -> np.ndarray | None:
        """Foreground probability at the input size."""
        if self.foreground is None:
            return None
        return _upsample(self.foreground[None], self.stride, self.full_shape)[0]

    def affinities(self, native: bool = False) -> np.ndarray:
        """Cosine affinities (K,h,w) at the standard offsets, at input size or on the native grid."""
        emb = self.embedding if native else self.full_embedding()
        return embedding_affinities(torch.from_numpy(emb)[None], OFFSETS)[0].numpy()


def _upsample(maps: np.ndarray, stride: int, shape: tuple[int, int]) -> np.ndarray:
    """(C,h,w) maps on a 1/stride grid, bilinearly upsampled and cropped to ``shape``."""
    if stride == 1 and maps.shape[-2:] == tuple(shape):
        return maps
    t = torch.from_numpy(np.ascontiguousarray(maps))[None]
    size = (maps.shape[-2] * stride, maps.shape[-1] * stride)
    up = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0]
    return up[:, : shape[0], : shape[1]].numpy()


def prepare_image(image: np.ndarray, invert: bool = False) -> np.ndarray:
    """Validated, grayscale, robustly normalised float32 2D image."""
    gray = grayscale(image, invert=invert)
    if min(gray.shape) < MIN_SIDE:
        raise InputError(f"image is too small ({gray.shape[0]}x{gray.shape[1]}); need at least {MIN_SIDE} px per side")
    return normalize(gray)


def rescale_factor(diameter: float | None, train_diameter: float) -> float:
    """Factor that brings objects of ``diameter`` px to the training diameter (1 when unset)."""
    return 1.0 if diameter is None else float(train_diameter) / float(diameter)


def working_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H,W) of an image of ``shape`` rescaled by ``scale`` (what ``ndi.zoom`` returns)."""
    return tuple(int(round(n * scale)) for n in shape)


def working_image(image: np.ndarray, invert: bool = False, scale: float = 1.0) -> np.ndarray:
    """The image as the network sees it: prepared (:func:`prepare_image`), then rescaled by ``scale``."""
    prepared = prepare_image(image, invert=invert)
    working = rescaled(prepared, scale)
    if min(working.shape) < MIN_SIDE:
        raise InputError(f"the {prepared.shape[0]}x{prepared.shape[1]} image becomes too small "
                         f"({working.shape[0]}x{working.shape[1]}) once rescaled by {scale:.3g}")
    return working


def rescaled(prepared: np.ndarray, scale: float) -> np.ndarray:
    """A prepared image rescaled by ``scale`` (linear interpolation; itself when 1)."""
    return prepared if scale == 1.0 else ndi.zoom(prepared, scale, order=1)


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start positions of tiles of length ``tile`` covering ``n`` with at least ``overlap`` shared px."""
    if n <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(starts))


@torch.inference_mode()
def _network(model: EmbeddingUNet, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Native-resolution (1/stride) embedding and foreground probability of one normalised 2D image."""
    stride = model.config.stem_stride
    h, w = image.shape
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    m = model.size_multiple
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect" if h > ph and w > pw else "replicate")
    if model.config.in_channels != 1:
        x = x.repeat(1, model.config.in_channels, 1, 1)
    emb, fg, _ = model.forward_features(x)
    nh, nw = -(-h // stride), -(-w // stride)
    fg_np = torch.sigmoid(fg[0, 0, :nh, :nw]).numpy() if fg is not None else None
    return emb[0, :, :nh, :nw].numpy(), fg_np


def tiled_network(
    model: EmbeddingUNet,
    image: np.ndarray,
    tile: int = DEFAULT_TILE,
    overlap: int = TILE_OVERLAP,
    on_tile: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Native-resolution network output of a large image from overlapping tiles, each keeping its centre.

    Every output pixel comes from a tile in which it lies at least ``overlap/2`` px from an inner
    tile edge, so the stitched embedding has no seams; decoding then runs on the whole image, so
    no nucleus is split at a tile border. The image is padded to the network's size multiple and
    tiles start on multiples of its stride, so the result equals one whole-image pass.
    """
    s = model.config.stem_stride
    h, w = image.shape
    if tile < 2 * overlap:
        raise InputError(f"tile size {tile} must be at least twice the overlap ({overlap})")
    m = model.size_multiple  # pad like the whole-image pass does, so tiles see the same borders
    tile, overlap = max(m, tile - tile % m), overlap - overlap % s
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw)), mode="reflect" if h > ph and w > pw else "edge")
    H, W = image.shape
    ys, xs = _tile_starts(H, tile, overlap), _tile_starts(W, tile, overlap)
    emb = fg = None
    n_tiles, done = len(ys) * len(xs), 0
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            e, f = _network(model, image[y : y + tile, x : x + tile])
            if emb is None:
                emb = np.empty((e.shape[0], H // s, W // s), dtype=np.float32)
                fg = np.empty((H // s, W // s), dtype=np.float32) if f is not None else None
            th, tw = e.shape[1:]
            # keep the centre: cut half the overlap (in native px) on every side that borders another tile
            y0 = 0 if iy == 0 else (ys[iy - 1] + tile - y) // (2 * s)
            x0 = 0 if ix == 0 else (xs[ix - 1] + tile - x) // (2 * s)
            y1 = th if iy == len(ys) - 1 else th - (y + tile - ys[iy + 1]) // (2 * s)
            x1 = tw if ix == len(xs) - 1 else tw - (x + tile - xs[ix + 1]) // (2 * s)
            oy, ox = y // s, x // s
            emb[:, oy + y0 : oy + y1, ox + x0 : ox + x1] = e[:, y0:y1, x0:x1]
            if fg is not None:
                fg[oy + y0 : oy + y1, ox + x0 : ox + x1] = f[y0:y1, x0:x1]
            done += 1
            if on_tile is not None:
                on_tile(done, n_tiles)
    nh, nw = -(-h // s), -(-w // s)
    return emb[:, :nh, :nw], (fg[:nh, :nw] if fg is not None else None)


def network_output(model: EmbeddingUNet, working: np.ndarray, image_shape: tuple[int, int] | None = None,
                   scale: float = 1.0, tile: int = DEFAULT_TILE,
                   on_tile: Callable[[int, int], None] | None = None) -> NetworkOutput:
    """Network output of a :func:`working_image` that came from an image of ``image_shape`` (default: its own)."""
    start = time.perf_counter()
    emb, fg = tiled_network(model, working, tile=tile, on_tile=on_tile)
    return NetworkOutput(emb, fg, tuple(image_shape or working.shape), scale, time.perf_counter() - start,
                         stride=model.config.stem_stride, working_shape=working.shape)
