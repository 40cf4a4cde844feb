"""Annotated image folders (``images/*.tif`` + ``labels/*.tif``: 2D images, or (Z,Y,X) volumes for 3D models),
training sources, augmentation and random crops."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

from .inference import TRAIN_DIAMETER, working_image, working_volume
from .planes import plane_layout
from .preprocess import channel_image, detect_polarity, normalize

SPLIT_DIR = Path(__file__).parent / "splits"  # bundled split lists: <name>_{train,tune,val}.txt
MAX_RESCALE = 4.0  # training images are rescaled by at most this factor (or its inverse)


@dataclass(frozen=True)
class Sample:
    """One annotated image (or (Z,Y,X) volume): normalised float32 image, integer labels, its file stem and the rescale applied."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    scale: float = 1.0


def read_tiff(path: str | Path) -> np.ndarray:
    """Read a TIFF file, turning any reader failure into one clear ValueError."""
    try:
        return tifffile.imread(str(path))
    except Exception as exc:  # tifffile raises many types for bad files
        raise ValueError(f"cannot read {path} as TIFF: {exc}") from None


def is_volume_shape(shape: tuple[int, ...]) -> bool:
    """A (Z,Y,X) gray volume by the one stack rule (a short last axis would be channels)."""
    return len(shape) == 3 and len(plane_layout(shape)[0]) == 1


def folder_ndim(root: str | Path) -> int:
    """3 when ``root/images`` holds (Z,Y,X) volumes, 2 for images (read from the first file's header only)."""
    paths = sorted(Path(root, "images").glob("*.tif")) + sorted(Path(root, "images").glob("*.tiff"))
    if not paths:
        raise ValueError(f"no .tif images found in {Path(root, 'images')}")
    try:
        with tifffile.TiffFile(paths[0]) as tif:
            shape = tuple(tif.series[0].shape)
    except Exception as exc:  # tifffile raises many types for bad files
        raise ValueError(f"cannot read {paths[0]} as TIFF: {exc}") from None
    return 3 if is_volume_shape(shape) else 2


def image_polarity(raw: np.ndarray) -> bool:
    """Whether a training image (gray or RGB, or a (Z,Y,X) volume: its middle plane) shows dark nuclei on a bright
    background: the automatic rule of ``graphkd segment``, so models learn their input as they will receive it."""
    plane = raw[raw.shape[0] // 2] if is_volume_shape(raw.shape) else raw
    return detect_polarity(channel_image(plane, "luminance"))


def load_folder(root: str | Path, names: list[str] | None = None, invert: bool | None = None) -> list[Sample]:
    """Load ``root/images/*.tif`` with the same-named ``root/labels/*.tif``; ``names`` selects stems.

    (Z,Y,X) volumes are normalised as a whole (:func:`~napari_graphkd.inference.working_volume`);
    a folder holds images or volumes, not both. ``invert`` None: each image is inverted when it shows
    dark nuclei on a bright background (:func:`image_polarity`), as ``graphkd segment`` will give it to the model.
    """
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
        raw = read_tiff(path)
        flip = image_polarity(raw) if invert is None else invert
        image = working_volume(raw, invert=flip) if is_volume_shape(raw.shape) else working_image(raw, invert=flip)
        labels = read_tiff(label_path).astype(np.int32)
        if labels.shape != image.shape:
            raise ValueError(f"{path.name}: image shape {image.shape} != label shape {labels.shape}")
        if samples and samples[0].image.ndim != image.ndim:
            raise ValueError(f"{root} mixes 2D images and (Z,Y,X) volumes ({samples[0].name} and {path.name}); "
                             "keep volumes in a folder of their own")
        samples.append(Sample(path.stem, image, labels))
    return samples


def median_diameter(samples: list[Sample]) -> float:
    """Median equivalent-circle diameter (px) of the annotated objects: the model's object scale."""
    areas = np.concatenate([np.bincount(s.labels[s.labels > 0].ravel())[1:] for s in samples] or [np.zeros(0)])
    areas = areas[areas > 0]
    return float(2 * np.sqrt(np.median(areas) / np.pi)) if len(areas) else 0.0


def rescale_sample(sample: Sample, diameter: float = TRAIN_DIAMETER, fallback: float | None = None) -> Sample:
    """``sample`` zoomed so its median nucleus diameter (from the labels) is ``diameter``: size is handled by rescaling.

    Images without nuclei use ``fallback`` (e.g. their source's median diameter), else stay as they are.
    The image is resampled as :func:`inference.working_image` resamples a user's image for a given
    diameter, so training sees what inference will; labels use nearest neighbours on the same grid.
    """
    measured = median_diameter([sample]) or fallback
    if not measured:
        return sample
    factor = float(np.clip(diameter / measured, 1 / MAX_RESCALE, MAX_RESCALE))
    if abs(factor - 1.0) < 0.02:
        return sample
    image = ndi.zoom(sample.image, factor, order=1).astype(np.float32)
    labels = ndi.zoom(sample.labels, factor, order=0)
    return Sample(sample.name, image, labels.astype(np.int32), scale=sample.scale * factor)


def read_split(path: str | Path) -> list[str]:
    """Image stems of a split list (one per line; blank lines and ``#`` comments ignored)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read split list {path}: {exc.strerror}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def split_list_path(split: str, part: str) -> Path:
    """File of split ``part`` (train/tune/val): a bundled name (``bbbc039``) or a path prefix (``my/lists/set`` -> ``my/lists/set_train.txt``)."""
    bundled = SPLIT_DIR / f"{split}_{part}.txt"
    if "/" not in split and "\\" not in split and bundled.exists():
        return bundled
    own = Path(f"{split}_{part}.txt")
    if own.exists():
        return own
    known = sorted({p.stem.rsplit("_", 1)[0] for p in SPLIT_DIR.glob("*_train.txt")})
    raise ValueError(f"no split list {own} (bundled splits: {', '.join(known)})")


@dataclass(frozen=True)
class Source:
    """One training source: where its train and tune images lie, which stems to use, and its sampling weight.

    ``train=None`` trains on every image of ``folder`` that is not in ``tune``.
    """

    name: str
    folder: Path
    tune: tuple[str, ...]
    train: tuple[str, ...] | None = None
    weight: float = 1.0
    tune_folder: Path | None = None  # None: the tune images lie in ``folder`` too


def find_part(folder: Path, part: str, names: list[str]) -> Path:
    """The folder holding every image of split ``part``: ``folder/part`` (a laid-out set), ``folder``, or ``folder/../part``."""
    candidates = [c for c in (folder / part, folder, folder.parent / part) if (c / "images").is_dir()]
    for candidate in candidates:
        if set(names) <= {p.stem for p in (candidate / "images").iterdir()}:
            return candidate
    if not candidates:
        raise ValueError(f"{folder} must contain 'images/' and 'labels/' folders (or {part}/images/ and {part}/labels/)")
    missing = sorted(set(names) - {p.stem for p in (candidates[0] / "images").iterdir()})
    raise ValueError(f"{len(missing)} {part} images of the split are not in {candidates[0] / 'images'} (e.g. {missing[0]})")


def parse_source(spec: str, n_tune: int = 10, weight: float = 1.0) -> Source:
    """Source from ``DIR`` or ``DIR@SPLIT`` (train on the SPLIT_train list, tune on the SPLIT_tune list).

    Without a split, a ``tune/`` folder beside ``DIR=.../train`` (the ``graphkd data`` layout) is the tune
    split, else ``n_tune`` images of ``DIR`` are held out. With one, ``DIR`` holds all the images, or is
    a laid-out set with train/ and tune/ sub-folders, or is its train/ folder.
    """
    folder, _, split = spec.rpartition("@") if "@" in spec else (spec, "", "")
    folder = Path(folder)
    if split:
        lists = {part: read_split(split_list_path(split, part)) for part in ("train", "tune")}
        return Source(Path(split).name, find_part(folder, "train", lists["train"]), tuple(lists["tune"]),
                      tuple(lists["train"]), weight, find_part(folder, "tune", lists["tune"]))
    if not (folder / "images").is_dir():
        raise ValueError(f"{folder} must contain 'images/' and 'labels/' folders of .tif files")
    sibling = folder.parent / "tune"
    if folder.name == "train" and (sibling / "images").is_dir():
        tune = sorted(p.stem for p in (sibling / "images").iterdir() if p.suffix in (".tif", ".tiff"))
        return Source(folder.parent.name, folder, tuple(tune), None, weight, sibling)
    names = sorted(p.stem for p in folder.joinpath("images").iterdir() if p.suffix in (".tif", ".tiff"))
    _, tune = split_tune(names, n_tune, seed=0)
    return Source(folder.name, folder, tuple(tune), None, weight)


def load_source(source: Source, diameter: float | None = TRAIN_DIAMETER) -> tuple[list[Sample], list[Sample]]:
    """(train, tune) samples of a source, each rescaled to nuclei of ``diameter`` px (None: as they are)."""
    tune_names = set(source.tune)
    tune_folder = source.tune_folder or source.folder
    train = load_folder(source.folder, names=None if source.train is None else list(source.train)) if source.train != () else []
    if tune_folder == source.folder:
        train = [s for s in train if s.name not in tune_names]
    tune = load_folder(tune_folder, names=list(source.tune)) if source.tune else []
    if diameter is None:
        return train, tune
    fallback = median_diameter(train + tune)
    return [rescale_sample(s, diameter, fallback) for s in train], [rescale_sample(s, diameter, fallback) for s in tune]


def split_tune(names: list[str], n_tune: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (train, tune) split of image names; tune images never enter gradient steps."""
    order = np.random.default_rng(seed).permutation(len(names))
    tune = sorted(names[i] for i in order[:n_tune])
    return sorted(set(names) - set(tune)), tune


def load_train_tune(data_dir: str | Path, n_tune: int = 10) -> tuple[list[Sample], list[Sample]]:
    """(train, tune) samples of one source as they are (see :func:`parse_source`: a ``tune/`` folder beside
    ``.../train`` is the tune split, else ``n_tune`` images of ``data_dir`` are held out)."""
    return load_source(parse_source(str(data_dir), n_tune), diameter=None)


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
    acquisition_prob: float = 0.0  # chance to re-image a crop with a random camera (simulate_acquisition)


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


def simulate_acquisition(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Re-image a normalised crop with a random camera, then apply the project's normalisation.

    Signal level (5..3000 counts at intensity 1) and signal-to-noise ratio (5..200 there) set the
    offset whose shot (Poisson) noise and the read noise give it that SNR: dim and bright images,
    nuclei always visible. Sometimes the brightest pixels saturate, and half the time the counts are
    quantised to 8 bits, 20..255 levels above a random black level (dim 8-bit images).
    """
    signal = float(np.exp(rng.uniform(np.log(5.0), np.log(3000.0))))
    sigma = signal / float(np.exp(rng.uniform(np.log(5.0), np.log(200.0))))
    read = rng.uniform(0.0, 0.7) * sigma
    offset = max(0.0, sigma**2 - read**2)
    raw = rng.poisson(offset + signal * np.clip(img, 0.0, 4.0)).astype(np.float32)
    raw += rng.normal(0.0, read, raw.shape).astype(np.float32)
    if rng.random() < 0.25:
        raw = np.minimum(raw, np.percentile(raw, rng.uniform(97.0, 99.9)))
    if rng.random() < 0.5:
        black = float(np.percentile(raw, 1.0)) * rng.uniform(0.0, 1.0)  # the camera's black level
        top = max(float(raw.max()) - black, 1.0)
        levels = float(np.exp(rng.uniform(np.log(20.0), np.log(255.0))))
        quantised = np.clip(np.floor((raw - black) * levels / top), 0, 255).astype(np.uint8)
    else:
        gain = max(1.0, float(raw.max()) / 65535)  # counts per grey level, so the bright end fits 16 bits
        quantised = np.clip(np.round(raw / gain), 0, 65535).astype(np.uint16)
    return normalize(quantised)


def jitter_intensity(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Photometric augmentation: random camera, crop re-normalisation, gamma, gain/offset, blur, Gaussian noise."""
    if cfg.acquisition_prob > 0 and rng.random() < cfg.acquisition_prob:
        img = simulate_acquisition(img, rng)
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


def pick_samples(sources: list[list[Sample]], weights: list[float] | None, n: int, rng: np.random.Generator) -> list[Sample]:
    """``n`` random samples: each picks a source (uniformly, or by ``weights``), then an image of it uniformly."""
    if len(sources) == 1:
        return [sources[0][i] for i in rng.integers(0, len(sources[0]), n)]
    p = np.full(len(sources), 1.0 / len(sources)) if weights is None else np.asarray(weights, float) / np.sum(weights)
    return [sources[k][int(rng.integers(len(sources[k])))] for k in rng.choice(len(sources), n, p=p)]


def make_batch(samples: list[Sample] | list[list[Sample]], batch_size: int, cfg: AugmentConfig,
               rng: np.random.Generator, weights: list[float] | None = None):
    """Stack ``batch_size`` augmented crops: (B,1,S,S) images, (B,S,S) labels.

    ``samples`` is one list of samples, or one list per source (balanced by :func:`pick_samples`).
    """
    sources = samples if samples and isinstance(samples[0], list) else [samples]
    crops = [augment(s.image, s.labels, cfg, rng) for s in pick_samples(sources, weights, batch_size, rng)]
    return np.stack([c[0] for c in crops])[:, None], np.stack([c[1] for c in crops])
