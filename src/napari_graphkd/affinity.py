"""Pixel affinities: cosine similarities of embeddings at fixed offsets, and their targets.

Convention (used everywhere in the package): channel k of an affinity map relates pixel ``p`` to
pixel ``p + OFFSETS[k]``. Pairs whose partner falls outside the image are *invalid*: they are
zero in the map and excluded by the validity mask (no wrap-around, unlike the released code).
"""
from __future__ import annotations

import numpy as np
import torch

SHIFTS: tuple[int, ...] = (1, 3, 5, 9, 27)
OFFSETS: tuple[tuple[int, int], ...] = tuple(o for s in SHIFTS for o in ((-s, 0), (0, -s)))


def _slices(offset: tuple[int, int], shape: tuple[int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices (here, partner) such that ``x[here]`` and ``x[partner]`` are the pixel pairs p, p+offset."""
    here, there = [], []
    for d, n in zip(offset, shape):
        if d <= 0:
            here.append(slice(-d, n))
            there.append(slice(0, max(n + d, 0)))
        else:
            here.append(slice(0, max(n - d, 0)))
            there.append(slice(d, n))
    return (here[0], here[1]), (there[0], there[1])


def validity_mask(shape: tuple[int, int], offsets=OFFSETS) -> np.ndarray:
    """Boolean (K,H,W) mask of pixel pairs whose partner lies inside the image."""
    valid = np.zeros((len(offsets), *shape), dtype=bool)
    for k, off in enumerate(offsets):
        here, _ = _slices(off, shape)
        valid[(k, *here)] = True
    return valid


def embedding_affinities(embedding: torch.Tensor, offsets=OFFSETS, long_range_stride: int = 1) -> torch.Tensor:
    """Cosine affinities (B,K,H,W) in [-1,1] of L2-normalised embeddings (B,C,H,W); 0 where invalid.

    Without autograd (decoding) the dot products accumulate channel by channel in place: no
    (B,C,H,W) temporaries, 5-8x faster on large images. With autograd one product per offset.
    With ``long_range_stride`` s > 1, offsets longer than 1 px are computed only on the s x s grid
    a strided decoder reads (pixel p = first valid pixel + s * (i, j)) and are 0 elsewhere; those
    small products take one op per offset (per-channel ops would cost more in call overhead).
    """
    e = embedding.float()
    e = e * torch.rsqrt((e * e).sum(1, keepdim=True).clamp_min(1e-24))  # = F.normalize(eps=1e-12), faster on CPU
    b, _, h, w = e.shape
    out = e.new_zeros((b, len(offsets), h, w))
    in_place = not (torch.is_grad_enabled() and e.requires_grad)
    for k, off in enumerate(offsets):
        step = 1 if max(abs(o) for o in off) == 1 else long_range_stride
        here, there = (tuple(slice(s.start, s.stop, step) for s in part) for part in _slices(off, (h, w)))
        a, t = e[:, :, here[0], here[1]], e[:, :, there[0], there[1]]
        if in_place and step == 1:
            dot = out[:, k, here[0], here[1]]
            for a_channel, t_channel in zip(a.unbind(1), t.unbind(1)):  # one call for all channel views
                dot.addcmul_(a_channel, t_channel)
        else:
            out[:, k, here[0], here[1]] = (a * t).sum(1)
    return out


def label_affinities(labels: np.ndarray, offsets=OFFSETS) -> tuple[np.ndarray, np.ndarray]:
    """Target affinities (K,H,W) float32: 1 where both pixels share a label (background is one segment).

    Returns (target, valid); invalid pairs (partner outside the image, or either pixel labelled
    < 0 = not annotated) are 0 in the target and False in ``valid``.
    """
    h, w = labels.shape
    target = np.zeros((len(offsets), h, w), dtype=np.float32)
    valid = validity_mask((h, w), offsets)
    unknown = labels < 0
    for k, off in enumerate(offsets):
        here, there = _slices(off, (h, w))
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
    """Class-balanced weighted MSE (docs/method.md, "Segmentation loss"), summed over offsets, divided by B*H*W."""
    weights = balance_weights(target, valid)
    b, _, h, w = affinities.shape
    return (weights * (affinities - target) ** 2).sum() / (b * h * w)
