"""Pixel (voxel) affinities: cosine similarities of embeddings at fixed offsets, and their targets, in 2D or 3D.

Convention (used everywhere in the package): channel k of an affinity map relates pixel ``p`` to
pixel ``p + offsets[k]``. Pairs whose partner falls outside the image are *invalid*: they are
zero in the map and excluded by the validity mask (no wrap-around, unlike the released code).
Every function works on images (offsets of length 2) and volumes (length 3); ``offsets=None``
means the isotropic defaults of the array's dimensionality (:func:`offsets_for`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SHIFTS: tuple[int, ...] = (1, 3, 5, 9, 27)
Offset = tuple[int, ...]
Offsets = Sequence[Sequence[int]]


def offsets_for(ndim: int, anisotropy: float = 1.0) -> tuple[Offset, ...]:
    """Default offsets: per shift in SHIFTS one negative offset along each axis, z first.

    In 3D the z shifts are divided by ``anisotropy`` (voxel z size / xy size), rounded, at least 1;
    duplicates that this creates are dropped. 2D gives (-s,0),(0,-s) per shift.
    """
    if ndim not in (2, 3):
        raise ValueError(f"offsets exist for 2D and 3D, not {ndim}D")
    if not anisotropy > 0:
        raise ValueError(f"anisotropy must be > 0, got {anisotropy}")
    offsets: list[Offset] = []
    for s in SHIFTS:
        for axis in range(ndim):
            step = max(1, round(s / anisotropy)) if (ndim == 3 and axis == 0) else s
            offset = tuple(-step if a == axis else 0 for a in range(ndim))
            if offset not in offsets:
                offsets.append(offset)
    return tuple(offsets)


OFFSETS: tuple[tuple[int, int], ...] = offsets_for(2)


def resolve_offsets(offsets: Offsets | None, ndim: int) -> tuple[Offset, ...]:
    """``offsets`` as tuples (None: the isotropic defaults), checked against the spatial dimensionality."""
    resolved = offsets_for(ndim) if offsets is None else tuple(tuple(int(v) for v in o) for o in offsets)
    if any(len(o) != ndim for o in resolved):
        raise ValueError(f"offsets {[list(o) for o in resolved][:2]}... do not match {ndim}D data")
    return resolved


def offsets_from_metadata(meta: dict) -> tuple[Offset, ...]:
    """The offsets a checkpoint was trained with (its ``offsets``), else the defaults of its config's dimensionality."""
    ndim = int(meta.get("config", {}).get("ndim", 2))
    return resolve_offsets(meta.get("offsets"), ndim)


def is_short(offset: Sequence[int]) -> bool:
    """Nearest-neighbour offset (longest component 1): attractive in the decoder, never strided."""
    return max(abs(o) for o in offset) == 1


def _slices(offset: Sequence[int], shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices (here, partner) such that ``x[here]`` and ``x[partner]`` are the pixel pairs p, p+offset."""
    here, there = [], []
    for d, n in zip(offset, shape):
        if d <= 0:
            here.append(slice(-d, n))
            there.append(slice(0, max(n + d, 0)))
        else:
            here.append(slice(0, max(n - d, 0)))
            there.append(slice(d, n))
    return tuple(here), tuple(there)


def validity_mask(shape: Sequence[int], offsets: Offsets | None = None) -> np.ndarray:
    """Boolean (K,*shape) mask of pixel pairs whose partner lies inside the image (or volume)."""
    offsets = resolve_offsets(offsets, len(shape))
    valid = np.zeros((len(offsets), *shape), dtype=bool)
    for k, off in enumerate(offsets):
        here, _ = _slices(off, shape)
        valid[(k, *here)] = True
    return valid


def embedding_affinities(embedding: torch.Tensor, offsets: Offsets | None = None, long_range_stride: int = 1) -> torch.Tensor:
    """Cosine affinities (B,K,*spatial) in [-1,1] of L2-normalised embeddings (B,C,*spatial); 0 where invalid.

    Without autograd (decoding) the dot products accumulate channel by channel in place: no
    (B,C,*spatial) temporaries, 5-8x faster on large images. With autograd one product per offset.
    With ``long_range_stride`` s > 1, offsets longer than 1 px are computed only on the stride-s grid
    a strided decoder reads (pixel p = first valid pixel + s * index, every axis) and are 0 elsewhere;
    those small products take one op per offset (per-channel ops would cost more in call overhead).
    """
    e = embedding.float()
    e = e * torch.rsqrt((e * e).sum(1, keepdim=True).clamp_min(1e-24))  # = F.normalize(eps=1e-12), faster on CPU
    b, _, *spatial = e.shape
    offsets = resolve_offsets(offsets, len(spatial))
    out = e.new_zeros((b, len(offsets), *spatial))
    in_place = not (torch.is_grad_enabled() and e.requires_grad)
    for k, off in enumerate(offsets):
        step = 1 if is_short(off) else long_range_stride
        here, there = (tuple(slice(s.start, s.stop, step) for s in part) for part in _slices(off, spatial))
        a, t = e[(slice(None), slice(None), *here)], e[(slice(None), slice(None), *there)]
        if in_place and step == 1:
            dot = out[(slice(None), k, *here)]
            for a_channel, t_channel in zip(a.unbind(1), t.unbind(1)):  # one call for all channel views
                dot.addcmul_(a_channel, t_channel)
        else:
            out[(slice(None), k, *here)] = (a * t).sum(1)
    return out


def label_affinities(labels: np.ndarray, offsets: Offsets | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Target affinities (K,*shape) float32: 1 where both pixels share a label (background is one segment).

    Returns (target, valid); invalid pairs (partner outside the image, or either pixel labelled
    < 0 = not annotated) are 0 in the target and False in ``valid``.
    """
    offsets = resolve_offsets(offsets, labels.ndim)
    target = np.zeros((len(offsets), *labels.shape), dtype=np.float32)
    valid = validity_mask(labels.shape, offsets)
    unknown = labels < 0
    for k, off in enumerate(offsets):
        here, there = _slices(off, labels.shape)
        target[(k, *here)] = labels[here] == labels[there]
        if unknown.any():
            valid[(k, *here)] &= ~(unknown[here] | unknown[there])
    target[~valid] = 0
    return target, valid


def balance_weights(target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sample class-balancing weights (docs/method.md, "Segmentation loss"; positive fraction clipped to [0.05, 0.99])."""
    dims = tuple(range(1, target.dim()))
    n_valid = valid.float().sum(dims, keepdim=True).clamp_min(1.0)
    frac = ((target * valid).sum(dims, keepdim=True) / n_valid).clamp(0.05, 0.99)
    pos_weight = torch.where(frac > 0.5, torch.ones_like(frac), (1 - frac) / frac)
    neg_weight = torch.where(frac > 0.5, frac / (1 - frac), torch.ones_like(frac))
    return torch.where(target > 0.5, pos_weight, neg_weight) * valid.float()


def affinity_loss(affinities: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Class-balanced weighted MSE (docs/method.md, "Segmentation loss"), summed over offsets, divided by B * pixels."""
    weights = balance_weights(target, valid)
    return (weights * (affinities - target) ** 2).sum() / affinities[:, 0].numel()
