"""Decoding policy: a network output to instance labels at the image's size.

Chooses the decoding grid (full resolution, or a 2x/4x coarser grid with outlines placed at full
resolution), the affinities the mutex watershed reads, and brings the labels back from the
network's working size to the input image's size.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage as ndi

from ..affinity import Offsets, embedding_affinities
from .mws import DecodeSettings, decode, refine_upsampled

if TYPE_CHECKING:
    from ..inference import NetworkOutput

COARSE_FACTORS = {"full": 1, "half": 2, "quarter": 4}  # decoding grid per DecodeSettings.resolution


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
    """k x k (x k) average pooling of (C,*spatial) maps (partial last rows/columns are averaged too)."""
    pool = torch.nn.functional.avg_pool2d if maps.ndim == 3 else torch.nn.functional.avg_pool3d
    return pool(torch.from_numpy(maps)[None], k, ceil_mode=True)[0].numpy()


def decoding_affinities(embedding: np.ndarray, settings: DecodeSettings, offsets: Offsets | None = None) -> np.ndarray:
    """Affinities (K,*spatial) of a (C,*spatial) embedding, long-range ones only where the decoder's stride grid reads them."""
    stride = 1 if settings.randomized_strides else settings.long_range_stride
    return embedding_affinities(torch.from_numpy(embedding)[None], offsets, stride)[0].numpy()


def decode_output(output: NetworkOutput, settings: DecodeSettings = DecodeSettings(),
                  offsets: Offsets | None = None) -> tuple[np.ndarray, float]:
    """Instance labels at the original image size, and the decode time (affinities + MWS + clean-up).

    ``offsets``: the model's (3D checkpoints record theirs); None = the defaults of the output's dimensionality.

    A process that offloads large decodes (the napari widgets) runs them in a worker (decode/process.py).
    """
    from .process import decode_in_worker, wants_worker  # here, not at the top: process.py imports this module

    if wants_worker(output):
        return decode_in_worker(output, settings, offsets)
    start = time.perf_counter()
    factor = COARSE_FACTORS[settings.resolution]
    if factor > 1:
        emb, fg = coarse_grid(output, factor)
        coarse_settings = replace(settings, min_size=max(1, settings.min_size // factor ** (emb.ndim - 1)),  # px or voxels
                                  merge_distance=max(1, settings.merge_distance // factor))
        coarse = decode(decoding_affinities(emb, settings, offsets), fg, coarse_settings, offsets)
        labels = refine_upsampled(coarse, output.full_foreground(), output.full_shape, settings, factor)
    else:
        labels = decode(decoding_affinities(output.full_embedding(), settings, offsets), output.full_foreground(), settings,
                        offsets)
    if labels.shape != output.image_shape:
        zoom = [o / s for o, s in zip(output.image_shape, labels.shape)]
        labels = ndi.zoom(labels, zoom, order=0, grid_mode=True, mode="nearest")
    return labels.astype(np.int32), time.perf_counter() - start
