"""Planning a fine-tuning run (cheap; validates everything before a job starts).

Images go through the same input rules as inference (grayscale, optional inversion, percentile
normalisation) and are rescaled so that nuclei have the model's training diameter. With 3D models
(checkpoint config ``ndim=3``) the inputs are (Z,Y,X) volumes with painted (Z,Y,X) labels, prepared
as the Segment widget prepares a volume (normalised as a whole, rescaled per axis to the models'
voxel proportions, :func:`napari_graphkd.segment.volume_scale`) and trained on random 3D crops.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ...affinity import Offsets, offsets_from_metadata
from ...data import Sample, image_polarity, median_diameter
from ...inference import MIN_PLANES, MIN_SIDE, TRAIN_DIAMETER, working_image, working_shape, working_volume
from ...io.checkpoint import read_metadata
from ...preprocess import InputError, to_grayscale
from ...segment import VoxelSize, check_voxel_size, volume_scale
from ..distill import ALIGN
from .rules import annotation_map, exclude_cells, split_cells

MODES: dict[str, str] = {
    "distil": "Distil the student from the teacher",
    "finetune": "Fine-tune the student with my annotation",
    "teacher": "Fine-tune the teacher, then re-distil the student",
}
MIN_HELDOUT_BAND = 4
MIN_CROP = 64


@dataclass(frozen=True)
class AnnotatedImage:
    """One image (gray or RGB) with its partial annotation: painted ids > 0 and optional checked regions."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    checked: np.ndarray | None = None  # (H,W) (volumes: (Z,Y,X)) bool: inside, unpainted pixels are background


TEACHER_LAYERS = ("all", "decoder")


@dataclass(frozen=True)
class FinetuneSettings:
    """What is trained and how long; the defaults are the measured choice of docs/finetune.md ("Defaults").

    ``steps``/``lr`` are the student's (every mode); ``teacher_steps``/``teacher_lr``/``teacher_layers``
    apply to the teacher's phase of ``teacher`` mode only. ``teacher_layers="decoder"`` keeps the
    teacher's encoder weights fixed. ``scale_augment`` rescales the teacher's crops by 0.8-1.25x (2D only).
    With 3D models ``volume_crop`` (z, y, x) replaces ``crop``, ``voxel_size`` (z, y, x) is the
    volumes' voxel size (None: the models' own) and ``diameter`` (None: as trained) rescales them as the
    Segment widget does.
    """

    mode: str = "teacher"
    steps: int = 300
    teacher_steps: int = 150
    batch_size: int = 4
    crop: int = 128
    lr: float = 1e-3
    teacher_lr: float = 1e-3
    teacher_layers: str = "all"
    scale_augment: bool = False
    margin: int = 8
    diameter: float | None = None  # nucleus diameter in the user's images (px); None: measure the painted cells
    invert: bool | None = None  # dark nuclei on a bright background; None: detected on the images, as segment does
    seed: int = 0
    volume_crop: tuple[int, int, int] = (16, 64, 64)  # 3D models: training crop (z, y, x) in voxels
    voxel_size: VoxelSize | None = None  # 3D models: the volumes' voxel size (z, y, x); None = the models' own

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.teacher_layers not in TEACHER_LAYERS:
            raise ValueError(f"unknown teacher_layers {self.teacher_layers!r}; known: {', '.join(TEACHER_LAYERS)}")
        if min(self.steps, self.teacher_steps, self.batch_size) < 1 or self.margin < 0 or self.crop < MIN_CROP:
            raise ValueError("steps, teacher_steps and batch_size must be >= 1, margin >= 0 and crop >= 64")
        if self.lr <= 0 or self.teacher_lr <= 0:
            raise ValueError("learning rates must be > 0")
        if len(self.volume_crop) != 3 or self.volume_crop[0] < MIN_PLANES or min(self.volume_crop[1:]) < MIN_SIDE:
            raise ValueError(f"volume_crop must be (z, y, x) with z >= {MIN_PLANES} and y, x >= {MIN_SIDE}")
        object.__setattr__(self, "volume_crop", tuple(int(n) for n in self.volume_crop))
        object.__setattr__(self, "voxel_size", check_voxel_size(self.voxel_size))


@dataclass(frozen=True)
class HeldOut:
    """The held-out cells (original ids, 0 elsewhere) of one image at its original size."""

    name: str
    image: np.ndarray
    cells: np.ndarray
    whole_image: bool
    annotation: np.ndarray  # around the held-out cells: their ids, 0 checked background, -1 elsewhere

    def describe(self, painted: int) -> str:
        """One line: which cells were held back."""
        n = len(np.unique(self.cells)) - 1
        if self.whole_image:
            return f"image {self.name!r} held out entirely ({n} painted cells)"
        return f"{n} of {painted} painted cells of {self.name!r} held out"


@dataclass
class FinetunePlan:
    """Validated inputs of one run: training samples at the model's scale and the held-out cells."""

    settings: FinetuneSettings
    teacher_path: Path
    student_path: Path
    train: list[Sample]  # normalised, rescaled; labels: training map (ids, 0 checked background, -1 not annotated)
    student_train: list[Sample]  # what the student learns from: ``train``, or whole images in ``teacher`` mode
    heldout: HeldOut
    painted_cells: int
    train_cells: int
    diameter: float | None  # nucleus diameter in the user's pixels (3D: None = run as trained)
    train_diameter: float
    invert: bool
    crop: int | tuple[int, int, int]  # square side (2D) or (z, y, x) (3D)
    scale: float | tuple[float, float, float]  # factor from the user's pixels (per axis for volumes) to the models' scale
    ndim: int = 2  # the models' dimensionality: 2 images, 3 volumes
    voxel_size: VoxelSize | None = None  # 3D: the volumes' voxel size as given (None: the models' own)
    offsets: Offsets | None = None  # 3D: the models' affinity offsets (None for 2D: the defaults)


@dataclass(frozen=True)
class ModelFacts:
    """What teacher and student share and a plan needs to know of them."""

    ndim: int
    train_diameter: float
    voxel_size: VoxelSize | None = None  # 3D: voxel size of their training volumes (None: isotropic)
    offsets: Offsets | None = None  # 3D: their affinity offsets


def _size(shape: tuple[int, ...]) -> str:
    """A shape as ``HxW`` or ``ZxYxX``."""
    return "x".join(map(str, shape))


def _check_image(item: AnnotatedImage, ndim: int = 2) -> np.ndarray:
    """Grayscale version of the image (3D models: the volume) after checking its annotation and checked regions fit it."""
    if ndim == 3:
        if np.ndim(item.image) != 3 or np.ndim(item.labels) != 3:
            raise InputError(f"the models are 3D: they fine-tune on (Z,Y,X) volumes with painted (Z,Y,X) labels; "
                             f"{item.name!r} is {_size(np.shape(item.image))} with {_size(np.shape(item.labels))} labels")
        gray = np.asarray(item.image)
    elif np.ndim(item.labels) == 3:
        raise InputError(f"the models are 2D: the painted (Z,Y,X) labels of {item.name!r} need 3D models "
                         f"(checkpoint ndim 3); fine-tune 2D models on 2D images")
    else:
        gray = to_grayscale(item.image)
    if np.shape(item.labels) != gray.shape:
        raise InputError(f"the annotation of {item.name!r} has shape {np.shape(item.labels)}, "
                         f"the image is {_size(gray.shape)}")
    if not np.issubdtype(np.asarray(item.labels).dtype, np.integer) or np.min(item.labels) < 0:
        raise InputError(f"the annotation of {item.name!r} must hold non-negative integer ids (0 = not painted)")
    if item.checked is not None:
        if np.shape(item.checked) != gray.shape:
            raise InputError(f"the checked regions of {item.name!r} have shape {np.shape(item.checked)}, "
                             f"the image is {_size(gray.shape)}")
        if not np.any(item.checked):
            raise InputError(f"the checked regions of {item.name!r} cover no pixel of the image")
    return gray


def _model_facts(teacher_path: Path, student_path: Path) -> ModelFacts:
    """Dimensionality and training diameter (for 3D also voxel size and offsets) shared by teacher and student."""
    t_meta, s_meta = read_metadata(teacher_path), read_metadata(student_path)
    t_nd, s_nd = (int(m.get("config", {}).get("ndim", 2)) for m in (t_meta, s_meta))
    if t_nd != s_nd:
        raise InputError(f"the teacher is a {t_nd}D model and the student a {s_nd}D one; choose two 2D or two 3D models")
    t_d = float(t_meta.get("train_diameter", TRAIN_DIAMETER))
    s_d = float(s_meta.get("train_diameter", TRAIN_DIAMETER))
    if abs(t_d - s_d) > 0.5:
        raise InputError(f"teacher and student were trained for different nucleus diameters ({t_d:.1f} vs {s_d:.1f} px)")
    if s_nd == 2:
        return ModelFacts(2, s_d)
    t_vox, s_vox = (check_voxel_size(m.get("voxel_size")) for m in (t_meta, s_meta))
    t_ratio, s_ratio = (np.divide(v or (1.0, 1.0, 1.0), (v or (1.0, 1.0, 1.0))[2]) for v in (t_vox, s_vox))
    if not np.allclose(t_ratio, s_ratio, rtol=0.01):
        raise InputError(f"teacher and student were trained at different voxel proportions "
                         f"({':'.join(f'{v:g}' for v in t_ratio)} vs {':'.join(f'{v:g}' for v in s_ratio)} z:y:x)")
    offsets = offsets_from_metadata(t_meta)
    if offsets != offsets_from_metadata(s_meta):
        raise InputError("teacher and student use different affinity offsets; distil the student from this teacher first")
    return ModelFacts(3, s_d, s_vox, offsets)


def detect_invert(grays: list[np.ndarray]) -> bool:
    """Inversion for a set of images: dark nuclei on a bright background in most of them (the rule `graphkd segment`
    applies per image; a volume's middle plane, as segment does), so a model fine-tuned without a stated polarity sees
    its input as segment will give it."""
    return 2 * sum(image_polarity(g) for g in grays) > len(grays)


def working_labels(labels: np.ndarray, scale: float | tuple[float, ...]) -> np.ndarray:
    """A label map (or volume) at the model's scale (nearest neighbour; -1 stays -1)."""
    return labels if set(np.atleast_1d(scale)) == {1.0} else ndi.zoom(labels, scale, order=0)


def working_input(image: np.ndarray, invert: bool, scale: float | tuple[float, ...], volume: bool) -> np.ndarray:
    """An image (3D models: a (Z,Y,X) volume) as the network sees it, float32, as inference prepares it."""
    return (working_volume(image, invert, scale) if volume else working_image(image, invert, scale)).astype(np.float32)


def annotated_window(train_map: np.ndarray, size: int | tuple[int, ...]) -> tuple[slice, ...]:
    """Bounding box of the annotated pixels (>= 0), grown to at least ``size`` per axis inside the image (or volume)."""
    sizes = (size,) * train_map.ndim if isinstance(size, int) else tuple(size)
    out = []
    for coords, n, side in zip(np.nonzero(train_map >= 0), train_map.shape, sizes):
        lo, extent = int(coords.min()), int(coords.max()) + 1 - int(coords.min())
        length = min(n, max(side, extent))
        start = min(max(0, lo - (length - extent) // 2), n - length)
        out.append(slice(start, start + length))
    return tuple(out)


def split_heldout(images: list[AnnotatedImage], settings: FinetuneSettings,
                  sampling: tuple[float, ...] | None = None) -> tuple[HeldOut, list[np.ndarray]]:
    """The held-out cells, and the training maps (see :func:`annotation_map`, ``sampling`` of volumes) of the images trained on."""
    if len(images) > 1:
        last = images[-1]
        if not (last.labels > 0).any():
            raise InputError(f"the last image ({last.name!r}) is held out for scoring and needs painted cells")
        heldout = HeldOut(last.name, last.image, np.asarray(last.labels, dtype=np.int32), whole_image=True,
                          annotation=annotation_map(last.labels, last.checked, settings.margin, sampling))
        return heldout, [annotation_map(item.labels, item.checked, settings.margin, sampling) for item in images[:-1]]
    only = images[0]
    held = np.isin(only.labels, split_cells(only.labels, settings.seed)[1])
    band = max(settings.margin, MIN_HELDOUT_BAND)
    full_map = annotation_map(only.labels, only.checked, settings.margin, sampling)
    near = exclude_cells(np.zeros_like(full_map), held, band, sampling) < 0  # the held-out cells and their band
    own = np.where(near & ((full_map <= 0) | held), full_map, -1).astype(np.int32)  # other cells: not judged here
    heldout = HeldOut(only.name, only.image, np.where(held, only.labels, 0).astype(np.int32), whole_image=False, annotation=own)
    train_map = annotation_map(np.where(held, 0, only.labels), only.checked, settings.margin, sampling)
    return heldout, [exclude_cells(train_map, held, band, sampling)]


def training_sample(name: str, image: np.ndarray, train_map: np.ndarray, invert: bool, scale: float | tuple[float, ...]) -> Sample:
    """Normalised image (a volume when the training map is 3D) and training map at the model's scale."""
    working = working_input(image, invert, scale, volume=train_map.ndim == 3)
    return Sample(name, working, working_labels(train_map, scale).astype(np.int32))


def _windowed(sample: Sample, size: int | tuple[int, ...]) -> Sample:
    """The sample cut to the window around its annotated pixels (unchanged if it has none)."""
    if not (sample.labels >= 0).any():
        return sample
    window = annotated_window(sample.labels, size)
    return Sample(sample.name, np.ascontiguousarray(sample.image[window]), np.ascontiguousarray(sample.labels[window]))


def plan_finetune(images: list[AnnotatedImage], settings: FinetuneSettings, teacher_path: str | Path,
                  student_path: str | Path) -> FinetunePlan:
    """Validate the inputs and build the training samples and held-out cells; InputError says what is wrong.

    In ``distil`` mode the annotation is not trained on (every training pixel is unannotated) and
    whole images are used; otherwise each image is cut to the window around its annotated pixels.
    In ``teacher`` mode the student still learns from whole images (every image but the held-out
    one, painted or not): the teacher's outputs teach it where nobody painted.
    """
    if not images:
        raise InputError("choose at least one image with its annotation")
    facts = _model_facts(Path(teacher_path), Path(student_path))
    grays = [_check_image(item, facts.ndim) for item in images]
    if facts.ndim == 2 and settings.voxel_size is not None:
        raise InputError("a voxel size applies to volumes fine-tuned with 3D models; these models are 2D")
    invert = detect_invert(grays) if settings.invert is None else settings.invert
    painted = sum(len(np.unique(item.labels[item.labels > 0])) for item in images)
    if painted == 0:
        raise InputError("the annotation has no painted cell: paint some nuclei (label ids > 0) first")
    heldout, maps = split_heldout(images, settings, volume_sampling(settings, facts))
    train_cells = sum(len(np.unique(m[m > 0])) for m in maps)
    if settings.mode != "distil" and train_cells == 0:
        raise InputError("no painted cell is left for training once the held-out cells are set aside: paint more cells")
    if facts.ndim == 3:
        diameter, scale = _volume_scale(images, settings, facts)
    else:
        diameter = settings.diameter or median_diameter([Sample(i.name, g, i.labels) for i, g in zip(images, grays)])
        scale = facts.train_diameter / diameter
        smallest = min(min(g.shape) for g in grays) * scale
        if smallest < MIN_CROP:
            raise InputError(f"the images are too small: {smallest:.0f} px per side once nuclei of {diameter:.1f} px are "
                             f"rescaled to the model's {facts.train_diameter:.1f} px; need at least {MIN_CROP}")
    if settings.mode == "distil":
        maps = [np.full_like(m, -1) for m in maps]
    train = [training_sample(f"{i}:{item.name}", item.image, m, invert, scale)
             for i, (item, m) in enumerate(zip(images, maps))]
    if facts.ndim == 3:
        crop = tuple(min([side] + [s.image.shape[a] for s in train]) for a, side in enumerate(settings.volume_crop))
    else:
        crop = min([settings.crop] + [min(s.image.shape) for s in train]) // ALIGN * ALIGN
    whole = train
    if settings.mode != "distil":
        train = [_windowed(s, crop) for s in train]
    student_train = whole if settings.mode == "teacher" else train
    return FinetunePlan(settings, Path(teacher_path), Path(student_path), train, student_train, heldout, painted, train_cells,
                        None if diameter is None else float(diameter), facts.train_diameter, invert, crop, scale,
                        facts.ndim, settings.voxel_size, facts.offsets)


def volume_sampling(settings: FinetuneSettings, facts: ModelFacts) -> tuple[float, float, float] | None:
    """A volume's voxel size in units of its x pixels (the given one, else the models' own); None for 2D images."""
    if facts.ndim == 2:
        return None
    voxel = settings.voxel_size or facts.voxel_size or (1.0, 1.0, 1.0)
    return tuple(v / voxel[2] for v in voxel)


def _volume_scale(images: list[AnnotatedImage], settings: FinetuneSettings,
                  facts: ModelFacts) -> tuple[float | None, tuple[float, float, float]]:
    """(diameter, per-axis scale) of volumes for 3D models, as the Segment widget runs them; InputError if one is too small."""
    if settings.scale_augment:
        raise InputError("scale augmentation applies to 2D images; volumes train at the models' scale")
    scale = volume_scale(settings.diameter, facts.train_diameter, settings.voxel_size, facts.voxel_size)
    for item in images:
        working = working_shape(np.shape(item.image), scale)
        if working[0] < MIN_PLANES or min(working[1:]) < MIN_SIDE:
            raise InputError(f"the volume {item.name!r} ({_size(np.shape(item.image))}) becomes {_size(working)} at the "
                             f"models' scale; fine-tuning needs at least {MIN_PLANES} planes of {MIN_SIDE}x{MIN_SIDE} px")
    return settings.diameter, scale
