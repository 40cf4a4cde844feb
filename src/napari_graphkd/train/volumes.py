"""Volume training samples: random 3D crops, flips and quarter turns in y-x only, intensity jitter.

z is never flipped or rotated into y-x: anisotropic volumes (coarse z) keep their axes' meaning,
and the z offsets the network learns stay z offsets.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..affinity import offsets_for
from ..data import AugmentConfig, Sample, jitter_intensity
from ..preprocess import normalize

Crop = tuple[int, int, int]


def volume_offsets(voxel_size: Sequence[float] | None) -> tuple[tuple[int, int, int], ...]:
    """Default 3D offsets for volumes of ``voxel_size`` (z, y, x): z shifts divided by the anisotropy z / y."""
    if voxel_size is None:
        return offsets_for(3)
    if len(voxel_size) != 3 or min(voxel_size) <= 0:
        raise ValueError(f"voxel_size must be three positive numbers (z, y, x), got {voxel_size}")
    return offsets_for(3, float(voxel_size[0]) / float(voxel_size[1]))


def volume_sample(name: str, image: np.ndarray, labels: np.ndarray) -> Sample:
    """A training sample of a (Z,Y,X) volume as stored: the whole volume normalised as images are (percentiles), int32 labels."""
    if image.ndim != 3 or image.shape != labels.shape:
        raise ValueError(f"{name}: expected same-shaped (Z,Y,X) image and labels, got {image.shape} and {labels.shape}")
    return Sample(name, normalize(image.astype(np.float32)), labels.astype(np.int32))


def random_volume_crop(image: np.ndarray, labels: np.ndarray, size: Crop, rng: np.random.Generator):
    """A ``size`` (z, y, x) window at a random origin (image reflect-padded, labels 0-padded where the volume is smaller)."""
    pads = [(0, max(0, s - n)) for s, n in zip(size, image.shape)]
    if any(p for _, p in pads):
        image = np.pad(image, pads, mode="reflect" if all(n > p for n, (_, p) in zip(image.shape, pads)) else "edge")
        labels = np.pad(labels, pads, mode="constant")
    origin = [int(rng.integers(0, n - s + 1)) for n, s in zip(image.shape, size)]
    window = tuple(slice(o, o + s) for o, s in zip(origin, size))
    return image[window], labels[window]


def turn_yx(volume: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Rotate a (..., Y, X) array by k quarter turns in y-x, then optionally mirror x; z untouched."""
    out = np.rot90(volume, k, axes=(-2, -1))
    return out[..., ::-1] if flip else out


def augment_volume(image: np.ndarray, labels: np.ndarray, cfg: AugmentConfig, size: Crop, rng: np.random.Generator):
    """One random training crop of a volume: crop, y-x quarter turns and mirror (if ``cfg.flips``), intensity jitter."""
    img, lab = random_volume_crop(image, labels, size, rng)
    if cfg.flips:
        k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        if size[1] != size[2]:
            k = 2 * (k % 2)  # only half turns keep a non-square y-x crop's shape
        img, lab = turn_yx(img, k, flip), turn_yx(lab, k, flip)
    img = jitter_intensity(img, cfg, rng)
    return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(lab, dtype=np.int32)


def make_volume_batch(samples: list[Sample], batch_size: int, cfg: AugmentConfig, size: Crop, rng: np.random.Generator):
    """Stack ``batch_size`` augmented volume crops: (B,1,D,H,W) images, (B,D,H,W) labels."""
    crops = [augment_volume(samples[i].image, samples[i].labels, cfg, size, rng) for i in rng.integers(0, len(samples), batch_size)]
    return np.stack([c[0] for c in crops])[:, None], np.stack([c[1] for c in crops])
