"""Annotated image folders (``images/*.tif`` + ``labels/*.tif``), augmentation and random crops."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

from .inference import working_image
from .preprocess import normalize


@dataclass(frozen=True)
class Sample:
    """One annotated image: normalised float32 image, integer labels and its file stem."""

    name: str
    image: np.ndarray
    labels: np.ndarray


def read_tiff(path: str | Path) -> np.ndarray:
    """Read a TIFF file, turning any reader failure into one clear ValueError."""
    try:
        return tifffile.imread(str(path))
    except Exception as exc:  # tifffile raises many types for bad files
        raise ValueError(f"cannot read {path} as TIFF: {exc}") from None


def load_folder(root: str | Path, names: list[str] | None = None, invert: bool = False) -> list[Sample]:
    """Load ``root/images/*.tif`` with the same-named ``root/labels/*.tif``; ``names`` selects stems."""
    root = Path(root)
    image_dir, label_dir = root / "images", root / "labels"
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise ValueError(f"{root} must contain 'images/' and 'labels/' folders of .tif files")
    paths = sorted(image_dir.glob("*.tif")) + sorted(image_dir.glob("*.tiff"))
    if names is not None:
        wanted = set(names)
        paths = [p for p in paths if p.stem in wanted]
    if not paths:
        raise ValueError(f"no .tif images found in {image_dir}")
    samples = []
    for path in paths:
        label_path = label_dir / path.name
        if not label_path.exists():
            raise ValueError(f"missing label file {label_path} for image {path.name}")
        image = working_image(read_tiff(path), invert=invert)
        labels = read_tiff(label_path).astype(np.int32)
        if labels.shape != image.shape:
            raise ValueError(f"{path.name}: image shape {image.shape} != label shape {labels.shape}")
        samples.append(Sample(path.stem, image, labels))
    return samples


def median_diameter(samples: list[Sample]) -> float:
    """Median equivalent-circle diameter (px) of the annotated objects: the model's object scale."""
    areas = np.concatenate([np.bincount(s.labels[s.labels > 0].ravel())[1:] for s in samples] or [np.zeros(0)])
    areas = areas[areas > 0]
    return float(2 * np.sqrt(np.median(areas) / np.pi)) if len(areas) else 0.0


def split_tune(names: list[str], n_tune: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (train, tune) split of image names; tune images never enter gradient steps."""
    order = np.random.default_rng(seed).permutation(len(names))
    tune = sorted(names[i] for i in order[:n_tune])
    return sorted(set(names) - set(tune)), tune


def load_train_tune(data_dir: str | Path, n_tune: int = 10) -> tuple[list[Sample], list[Sample]]:
    """(train, tune) samples: the ``tune/`` folder beside a ``train/`` folder (the layout of ``graphkd data``)
    is the tune split; without one, :func:`split_tune` holds ``n_tune`` images of ``data_dir`` out."""
    data_dir = Path(data_dir)
    sibling = data_dir.parent / "tune"
    if data_dir.name == "train" and (sibling / "images").is_dir():
        return load_folder(data_dir), load_folder(sibling)
    samples = load_folder(data_dir)
    train_names, tune_names = split_tune([s.name for s in samples], n_tune, seed=0)
    return [s for s in samples if s.name in set(train_names)], [s for s in samples if s.name in set(tune_names)]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation switches and ranges."""

    crop: int = 256
    flips: bool = True
    scale_range: tuple[float, float] = (0.8, 1.25)
    elastic: bool = False
    gamma_range: tuple[float, float] = (0.7, 1.4)
    gain_range: tuple[float, float] = (0.75, 1.3)
    offset_range: tuple[float, float] = (-0.1, 0.1)
    noise_std: float = 0.03
    blur_prob: float = 0.2
    renormalize_prob: float = 0.2


def random_crop(image: np.ndarray, labels: np.ndarray, size: int, scale: float, rng: np.random.Generator):
    """Crop a ``size*scale`` window (reflect-padded if the image is small) and resize it to ``size``."""
    src = max(2, int(round(size * scale)))
    pad_h, pad_w = max(0, src - image.shape[0]), max(0, src - image.shape[1])
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w)), mode="reflect")
        labels = np.pad(labels, ((0, pad_h), (0, pad_w)), mode="constant")
    y = rng.integers(0, image.shape[0] - src + 1)
    x = rng.integers(0, image.shape[1] - src + 1)
    img, lab = image[y : y + src, x : x + src], labels[y : y + src, x : x + src]
    if src != size:
        zoom = size / src
        img = ndi.zoom(img, zoom, order=1, grid_mode=True, mode="reflect")[:size, :size]
        lab = ndi.zoom(lab, zoom, order=0, grid_mode=True, mode="nearest")[:size, :size]
    return img, lab


def elastic_deform(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, alpha: float = 16.0, sigma: float = 4.0):
    """Smooth random displacement field (alpha px, sigma smoothing) applied to image and labels."""
    shape = image.shape
    dy = ndi.gaussian_filter(rng.uniform(-1, 1, shape), sigma) * alpha
    dx = ndi.gaussian_filter(rng.uniform(-1, 1, shape), sigma) * alpha
    yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    coords = np.stack([yy + dy, xx + dx])
    img = ndi.map_coordinates(image, coords, order=1, mode="reflect")
    lab = ndi.map_coordinates(labels, coords, order=0, mode="reflect")
    return img.astype(np.float32), lab.astype(labels.dtype)


def augment(image: np.ndarray, labels: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator):
    """One random training crop: scale, crop, flips/rot90, optional elastic, re-normalisation, intensity jitter, noise."""
    scale = float(np.exp(rng.uniform(*np.log(cfg.scale_range)))) if cfg.scale_range else 1.0
    img, lab = random_crop(image, labels, cfg.crop, scale, rng)
    if cfg.flips:
        k = int(rng.integers(4))
        img, lab = np.rot90(img, k), np.rot90(lab, k)
        if rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
    if cfg.elastic and rng.random() < 0.5:
        img, lab = elastic_deform(np.ascontiguousarray(img), np.ascontiguousarray(lab), rng)
    img = jitter_intensity(img, cfg, rng)
    return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(lab, dtype=np.int32)


def jitter_intensity(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Photometric augmentation: crop re-normalisation, gamma, gain/offset, blur, Gaussian noise."""
    if rng.random() < cfg.renormalize_prob:
        # re-stretch the crop by its own percentiles: a nucleus-free crop becomes amplified noise,
        # as a whole empty image does after per-image normalisation (teaches "noise is background")
        img = normalize(img, min_contrast_snr=0.0)
    img = np.clip(img, 0, None) ** rng.uniform(*cfg.gamma_range)
    img = img * rng.uniform(*cfg.gain_range) + rng.uniform(*cfg.offset_range)
    if rng.random() < cfg.blur_prob:
        img = ndi.gaussian_filter(img, rng.uniform(0.3, 1.0))
    if cfg.noise_std > 0:
        img = img + rng.normal(0, rng.uniform(0, cfg.noise_std), img.shape)
    return img.astype(np.float32)


def make_batch(samples: list[Sample], batch_size: int, cfg: AugmentConfig, rng: np.random.Generator):
    """Stack ``batch_size`` augmented crops from random samples: (B,1,S,S) images, (B,S,S) labels."""
    picks = rng.integers(0, len(samples), batch_size)
    crops = [augment(samples[i].image, samples[i].labels, cfg, rng) for i in picks]
    return np.stack([c[0] for c in crops])[:, None], np.stack([c[1] for c in crops])
