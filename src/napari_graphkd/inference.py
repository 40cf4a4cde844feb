"""Running a network on an image: input rules, object-size rescaling, seamless tiling, decoding.

One code path serves the CLI, the benchmarks and the napari widgets. The network output is kept
(:class:`NetworkOutput`) so that decoder settings can be changed without re-running the network.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from scipy import ndimage as ndi

from .affinity import OFFSETS, embedding_affinities
from .decode.mws import DecodeSettings, decode, refine_upsampled
from .models import EmbeddingUNet
from .preprocess import InputError, grayscale, normalize

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
    """Network output for a raw 2D image (any dtype, gray/RGB), rescaled to the training object size.

    Its ``seconds`` count input preparation (normalisation, rescaling) and the network: everything
    before decoding, as the classical pipeline's time includes its own normalisation.
    """
    start = time.perf_counter()
    prepared = prepare_image(image, invert=invert)
    scale = rescale_factor(diameter, train_diameter)
    if scale != 1.0:
        prepared = ndi.zoom(prepared, scale, order=1)
        if min(prepared.shape) < MIN_SIDE:
            raise InputError(f"image becomes too small ({prepared.shape}) after rescaling to diameter {diameter}")
    emb, fg = tiled_network(model, prepared, tile=tile, on_tile=on_tile)
    return NetworkOutput(emb, fg, tuple(image.shape[:2]), scale, time.perf_counter() - start,
                         stride=model.config.stem_stride, working_shape=prepared.shape)


COARSE_FACTORS = {"full": 1, "half": 2, "quarter": 4}


def coarse_grid(output: NetworkOutput, factor: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Embedding and foreground on a grid ``factor`` times coarser than the input, by average
    pooling the network's native grid (a half-resolution network's own grid when factor is 2)."""
    if factor % output.stride:
        raise ValueError(f"cannot decode a stride-{output.stride} network on a {factor}x coarser grid")
    pool = factor // output.stride
    if pool == 1:
        return output.embedding, output.foreground
    fg = _pool(output.foreground[None], pool)[0] if output.foreground is not None else None
    return _pool(output.embedding, pool), fg


def _pool(maps: np.ndarray, k: int) -> np.ndarray:
    """k x k average pooling of (C,H,W) maps (partial last rows/columns are averaged too)."""
    return torch.nn.functional.avg_pool2d(torch.from_numpy(maps)[None], k, ceil_mode=True)[0].numpy()


def decoding_affinities(embedding: np.ndarray, settings: DecodeSettings) -> np.ndarray:
    """Affinities (K,h,w) of a (C,h,w) embedding, long-range ones only where the decoder's stride grid reads them."""
    stride = 1 if settings.randomized_strides else settings.long_range_stride
    return embedding_affinities(torch.from_numpy(embedding)[None], OFFSETS, stride)[0].numpy()


def decode_output(output: NetworkOutput, settings: DecodeSettings = DecodeSettings()) -> tuple[np.ndarray, float]:
    """Instance labels at the original image size, and the decode time (affinities + MWS + clean-up)."""
    start = time.perf_counter()
    factor = COARSE_FACTORS[settings.resolution]
    if factor > 1:
        emb, fg = coarse_grid(output, factor)
        coarse_settings = replace(settings, min_size=max(1, settings.min_size // factor**2),
                                  merge_distance=max(1, settings.merge_distance // factor))
        coarse = decode(decoding_affinities(emb, settings), fg, coarse_settings)
        labels = refine_upsampled(coarse, output.full_foreground(), output.full_shape, settings, factor)
    else:
        labels = decode(decoding_affinities(output.full_embedding(), settings), output.full_foreground(), settings)
    if labels.shape != output.image_shape:
        zoom = [o / s for o, s in zip(output.image_shape, labels.shape)]
        labels = ndi.zoom(labels, zoom, order=0, grid_mode=True, mode="nearest")
    return labels.astype(np.int32), time.perf_counter() - start
