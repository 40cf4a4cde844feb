"""Running a network on an image or volume: preparation at the model's scale, seamless tiling, the network output.

:func:`working_image` is the one preparation (input rules, normalisation, object-size rescaling)
every caller uses (:func:`working_volume` for a (Z,Y,X) volume given to a 3D network);
:func:`network_output` runs a 2D or 3D network on it, in overlapping tiles. The output is kept
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

from .affinity import embedding_affinities, resolve_offsets
from .models import EmbeddingUNet
from .preprocess import MAX_WORKING_PIXELS, InputError, check_finite, grayscale, normalize

TRAIN_DIAMETER = 28.0  # nucleus diameter (px) the bundled models were trained at (BBBC039: mean area ~600 px)
MIN_SIDE = 16
MIN_PLANES = 4  # a volume needs at least this many z planes (fewer: segment plane by plane)
DEFAULT_TILE = 1024
TILE_OVERLAP = 64
TILE_OVERLAP_3D = 16  # voxels shared by neighbouring 3D tiles (half of it is cut from each inner tile face)
MAX_WORKING_VOXELS = 2**26  # largest volume (after rescaling) a 3D network is run on: its embedding takes 4 GB

Scale = float | tuple[float, ...]  # one factor for every axis, or one per axis (volumes: z, y, x)


@dataclass
class NetworkOutput:
    """Network output for one 2D image or one (Z,Y,X) volume at the network's native resolution (cache it to re-decode)."""

    embedding: np.ndarray  # (C,h,w) or (C,d,h,w) float32 at 1/stride of the working size
    foreground: np.ndarray | None  # (h,w) / (d,h,w) probability, same grid
    image_shape: tuple[int, ...]  # original (H,W) or (Z,Y,X) of the input
    scale: Scale  # working size / original size (object-size rescaling; volumes: per axis)
    seconds: float  # input preparation + network
    stride: int | tuple[int, ...] = 1
    working_shape: tuple[int, ...] | None = None  # size the network saw; default: image_shape
    offsets: tuple[tuple[int, ...], ...] | None = None  # the model's affinity offsets; None: the defaults of its ndim

    @property
    def ndim(self) -> int:
        """2 for an image, 3 for a volume."""
        return self.embedding.ndim - 1

    @property
    def affinity_offsets(self) -> tuple[tuple[int, ...], ...]:
        """The offsets its affinities (and decoding) use."""
        return resolve_offsets(self.offsets, self.ndim)

    @property
    def full_shape(self) -> tuple[int, ...]:
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
        """Cosine affinities (K,*spatial) at its offsets, at input size or on the native grid."""
        emb = self.embedding if native else self.full_embedding()
        return embedding_affinities(torch.from_numpy(emb)[None], self.offsets)[0].numpy()


def per_axis(value: int | float | tuple, ndim: int) -> tuple:
    """``value`` for each of ``ndim`` axes: a tuple as given, a number repeated."""
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(f"expected {ndim} values (one per axis), got {tuple(value)}")
        return tuple(value)
    return (value,) * ndim


def _upsample(maps: np.ndarray, stride: int | tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """(C,*spatial) maps on a 1/stride grid, (bi/tri)linearly upsampled and cropped to ``shape``."""
    ndim = maps.ndim - 1
    strides = per_axis(stride, ndim)
    if set(strides) == {1} and maps.shape[1:] == tuple(shape):
        return maps
    t = torch.from_numpy(np.ascontiguousarray(maps))[None]
    size = tuple(n * s for n, s in zip(maps.shape[1:], strides))
    mode = "bilinear" if ndim == 2 else "trilinear"
    up = torch.nn.functional.interpolate(t, size=size, mode=mode, align_corners=False)[0]
    return up[(slice(None), *(slice(0, n) for n in shape))].numpy()


def prepare_image(image: np.ndarray, invert: bool = False) -> np.ndarray:
    """Validated, grayscale, robustly normalised float32 2D image."""
    gray = grayscale(image, invert=invert)
    if min(gray.shape) < MIN_SIDE:
        raise InputError(f"image is too small ({gray.shape[0]}x{gray.shape[1]}); need at least {MIN_SIDE} px per side")
    return normalize(gray)


def rescale_factor(diameter: float | None, train_diameter: float) -> float:
    """Factor that brings objects of ``diameter`` px to the training diameter (1 when unset)."""
    return 1.0 if diameter is None else float(train_diameter) / float(diameter)


def working_shape(shape: tuple[int, ...], scale: Scale) -> tuple[int, ...]:
    """Shape of an image or volume of ``shape`` rescaled by ``scale`` (what ``ndi.zoom`` returns)."""
    return tuple(int(round(n * f)) for n, f in zip(shape, per_axis(scale, len(shape))))


def working_image(image: np.ndarray, invert: bool = False, scale: float = 1.0) -> np.ndarray:
    """The image as the network sees it: prepared (:func:`prepare_image`), then rescaled by ``scale``."""
    prepared = prepare_image(image, invert=invert)
    working = rescaled(prepared, scale)
    if min(working.shape) < MIN_SIDE:
        raise InputError(f"the {prepared.shape[0]}x{prepared.shape[1]} image becomes too small "
                         f"({working.shape[0]}x{working.shape[1]}) once rescaled by {scale:.3g}")
    return working


def rescaled(prepared: np.ndarray, scale: Scale) -> np.ndarray:
    """A prepared image or volume rescaled by ``scale`` (linear interpolation; itself when 1)."""
    return prepared if set(per_axis(scale, prepared.ndim)) == {1.0} else ndi.zoom(prepared, scale, order=1)


def volume_tile(tile: int) -> int:
    """Side of a 3D tile (voxels) for a tile setting of ``tile`` px: the same number of voxels as a tile x tile
    image (1024 -> 102), at least twice the 3D overlap."""
    return max(2 * TILE_OVERLAP_3D, int(round(tile ** (2 / 3))))


def check_volume(shape: tuple[int, ...]) -> None:
    """InputError unless ``shape`` is a gray (Z,Y,X) volume a 3D network can run on."""
    if len(shape) != 3:
        raise InputError(f"a 3D model segments (Z,Y,X) volumes; the image has shape {tuple(shape)}")
    if shape[0] < MIN_PLANES or min(shape[1:]) < MIN_SIDE:
        raise InputError(f"the volume {'x'.join(map(str, shape))} is too small to segment as a volume; need at least "
                         f"{MIN_PLANES} planes of {MIN_SIDE}x{MIN_SIDE} px (segment thinner stacks plane by plane)")


def working_volume(volume: np.ndarray, invert: bool = False, scale: Scale = 1.0) -> np.ndarray:
    """A (Z,Y,X) volume as a 3D network sees it: float32, inverted if asked, normalised as a whole, rescaled per axis."""
    volume = np.asarray(volume)
    check_volume(volume.shape)
    check_finite(volume)
    big = working_shape(volume.shape, scale)
    if int(np.prod(big)) > MAX_WORKING_VOXELS:
        raise InputError(f"the volume {'x'.join(map(str, volume.shape))} would be {'x'.join(map(str, big))} voxels once "
                         f"rescaled (more than {MAX_WORKING_VOXELS:,}); segment a crop of it")
    gray = volume.astype(np.float32)
    if invert:
        gray = gray.max() - gray
    working = rescaled(normalize(gray), scale)
    check_volume(working.shape)
    return working


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start positions of tiles of length ``tile`` covering ``n`` with at least ``overlap`` shared px."""
    if n <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(starts))


def _pad_to(x: np.ndarray | torch.Tensor, multiple: tuple[int, ...]):
    """Pad the last len(multiple) axes at their far end to multiples of ``multiple`` (reflect, or edge when too short)."""
    shape = tuple(x.shape[-len(multiple):])
    pads = [(-n) % m for n, m in zip(shape, multiple)]
    if not any(pads):
        return x
    reflect = all(n > p for n, p in zip(shape, pads))
    if isinstance(x, np.ndarray):
        return np.pad(x, [(0, p) for p in pads], mode="reflect" if reflect else "edge")
    flat = [v for p in reversed(pads) for v in (0, p)]
    return torch.nn.functional.pad(x, flat, mode="reflect" if reflect else "replicate")


def network_geometry(model: EmbeddingUNet, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(stem stride, size multiple) of a network per axis (anisotropic 3D networks differ in z)."""
    multiples = getattr(model, "size_multiples", None) or per_axis(model.size_multiple, ndim)
    return tuple(model.config.stem_strides()), tuple(multiples)


def _stride_of(model: EmbeddingUNet, ndim: int) -> int | tuple[int, ...]:
    """The output grid's stride: one number when every axis shares it (2D networks, isotropic 3D ones), else per axis."""
    strides = network_geometry(model, ndim)[0]
    return strides[0] if len(set(strides)) == 1 else strides


@torch.inference_mode()
def _network(model: EmbeddingUNet, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Native-resolution (1/stride) embedding and foreground probability of one normalised 2D image or 3D volume."""
    stride, multiple = network_geometry(model, image.ndim)
    x = _pad_to(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None], multiple)
    if model.config.in_channels != 1:
        x = x.repeat(1, model.config.in_channels, *(1,) * image.ndim)
    emb, fg, _ = model.forward_features(x)
    native = tuple(slice(0, -(-n // s)) for n, s in zip(image.shape, stride))
    fg_np = torch.sigmoid(fg[(0, 0, *native)]).numpy() if fg is not None else None
    return emb[(0, slice(None), *native)].numpy(), fg_np


def tiled_network(
    model: EmbeddingUNet,
    image: np.ndarray,
    tile: int = DEFAULT_TILE,
    overlap: int = TILE_OVERLAP,
    on_tile: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Native-resolution network output of a large image or volume from overlapping tiles, each keeping its centre.

    Tiles are ``tile`` px (voxels) per side. Every output pixel comes from a tile in which it lies
    at least ``overlap/2`` px from an inner tile face, so the stitched embedding has no seams;
    decoding then runs on the whole image, so no object is split at a tile border. The image is
    padded to the network's size multiple and tiles start on multiples of its stride, so the result
    equals one whole-image pass.
    """
    if tile < 2 * overlap:
        raise InputError(f"tile size {tile} must be at least twice the overlap ({overlap})")
    n = len(image.shape)
    strides, multiple = network_geometry(model, n)
    size = image.shape
    image = _pad_to(image, multiple)  # pad like the whole-image pass does, so tiles see the same borders
    tiles = tuple(max(m, tile - tile % m) for m in multiple)
    laps = tuple(overlap - overlap % s for s in strides)
    starts = [_tile_starts(N, t, o) for N, t, o in zip(image.shape, tiles, laps)]
    emb = fg = None
    n_tiles, done = int(np.prod([len(st) for st in starts])), 0
    for position in np.ndindex(*(len(st) for st in starts)):
        window = tuple(slice(st[i], st[i] + t) for st, i, t in zip(starts, position, tiles))
        e, f = _network(model, image[window])
        if emb is None:
            native_full = tuple(N // s for N, s in zip(image.shape, strides))
            emb = np.empty((e.shape[0], *native_full), dtype=np.float32)
            fg = np.empty(native_full, dtype=np.float32) if f is not None else None
        keep, place = [], []
        for axis, (st, i, t, s) in enumerate(zip(starts, position, tiles, strides)):
            # keep the centre: cut half the overlap (in native px) on every face that borders another tile
            lo = 0 if i == 0 else (st[i - 1] + t - st[i]) // (2 * s)
            hi = e.shape[1 + axis] if i == len(st) - 1 else e.shape[1 + axis] - (st[i] + t - st[i + 1]) // (2 * s)
            keep.append(slice(lo, hi))
            place.append(slice(st[i] // s + lo, st[i] // s + hi))
        emb[(slice(None), *place)] = e[(slice(None), *keep)]
        if fg is not None:
            fg[tuple(place)] = f[tuple(keep)]
        done += 1
        if on_tile is not None:
            on_tile(done, n_tiles)
    native = tuple(slice(0, -(-N // s)) for N, s in zip(size, strides))
    return emb[(slice(None), *native)], (fg[native] if fg is not None else None)


def network_output(model: EmbeddingUNet, working: np.ndarray, image_shape: tuple[int, ...] | None = None,
                   scale: Scale = 1.0, tile: int = DEFAULT_TILE,
                   on_tile: Callable[[int, int], None] | None = None,
                   offsets: tuple[tuple[int, ...], ...] | None = None) -> NetworkOutput:
    """Network output of a :func:`working_image` (or :func:`working_volume`) that came from an image of
    ``image_shape`` (default: its own); ``offsets`` are the affinity offsets of a 3D network. A volume runs in
    cubes of :func:`volume_tile` voxels per side."""
    start = time.perf_counter()
    if working.ndim == 3:
        tile, overlap = volume_tile(tile), TILE_OVERLAP_3D
    else:
        overlap = TILE_OVERLAP
    emb, fg = tiled_network(model, working, tile=tile, overlap=overlap, on_tile=on_tile)
    return NetworkOutput(emb, fg, tuple(image_shape or working.shape), scale, time.perf_counter() - start,
                         stride=_stride_of(model, working.ndim), working_shape=working.shape, offsets=offsets)
