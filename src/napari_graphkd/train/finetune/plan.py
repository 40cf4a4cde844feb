"""Planning a fine-tuning run (cheap; validates everything before a job starts).

Images go through the same input rules as inference (grayscale, optional inversion, percentile
normalisation) and are rescaled so that nuclei have the model's training diameter.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ...data import Sample, median_diameter
from ...inference import TRAIN_DIAMETER, working_image
from ...io.checkpoint import read_metadata
from ...preprocess import InputError, detect_polarity, to_grayscale
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
    checked: np.ndarray | None = None  # (H,W) bool: inside, unpainted pixels are background


TEACHER_LAYERS = ("all", "decoder")


@dataclass(frozen=True)
class FinetuneSettings:
    """What is trained and how long; the defaults are the measured choice of docs/finetune.md ("Defaults").

    ``steps``/``lr`` are the student's (every mode); ``teacher_steps``/``teacher_lr``/``teacher_layers``
    apply to the teacher's phase of ``teacher`` mode only. ``teacher_layers="decoder"`` keeps the
    teacher's encoder weights fixed. ``scale_augment`` rescales the teacher's crops by 0.8-1.25x.
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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.teacher_layers not in TEACHER_LAYERS:
            raise ValueError(f"unknown teacher_layers {self.teacher_layers!r}; known: {', '.join(TEACHER_LAYERS)}")
        if min(self.steps, self.teacher_steps, self.batch_size) < 1 or self.margin < 0 or self.crop < MIN_CROP:
            raise ValueError("steps, teacher_steps and batch_size must be >= 1, margin >= 0 and crop >= 64")
        if self.lr <= 0 or self.teacher_lr <= 0:
            raise ValueError("learning rates must be > 0")


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
    diameter: float
    train_diameter: float
    invert: bool
    crop: int

    @property
    def scale(self) -> float:
        """Factor from the user's pixels to the model's training scale."""
        return self.train_diameter / self.diameter


def _check_image(item: AnnotatedImage) -> np.ndarray:
    """Grayscale version of the image after checking its annotation and checked regions fit it."""
    gray = to_grayscale(item.image)
    if np.ndim(item.labels) != 2 or np.shape(item.labels) != gray.shape:
        raise InputError(f"the annotation of {item.name!r} has shape {np.shape(item.labels)}, "
                         f"the image is {gray.shape[0]}x{gray.shape[1]}")
    if not np.issubdtype(np.asarray(item.labels).dtype, np.integer) or np.min(item.labels) < 0:
        raise InputError(f"the annotation of {item.name!r} must hold non-negative integer ids (0 = not painted)")
    if item.checked is not None:
        if np.shape(item.checked) != gray.shape:
            raise InputError(f"the checked regions of {item.name!r} have shape {np.shape(item.checked)}, "
                             f"the image is {gray.shape[0]}x{gray.shape[1]}")
        if not np.any(item.checked):
            raise InputError(f"the checked regions of {item.name!r} cover no pixel of the image")
    return gray


def _train_diameter(teacher_path: Path, student_path: Path) -> float:
    """Training diameter shared by teacher and student, from their metadata."""
    t_meta, s_meta = read_metadata(teacher_path), read_metadata(student_path)
    t_d = float(t_meta.get("train_diameter", TRAIN_DIAMETER))
    s_d = float(s_meta.get("train_diameter", TRAIN_DIAMETER))
    if abs(t_d - s_d) > 0.5:
        raise InputError(f"teacher and student were trained for different nucleus diameters ({t_d:.1f} vs {s_d:.1f} px)")
    return s_d


def detect_invert(grays: list[np.ndarray]) -> bool:
    """Inversion for a set of images: dark nuclei on a bright background in most of them (the rule `graphkd segment`
    applies per image), so a model fine-tuned without a stated polarity sees its input as segment will give it."""
    return 2 * sum(detect_polarity(g) for g in grays) > len(grays)


def working_labels(labels: np.ndarray, scale: float) -> np.ndarray:
    """A label map at the model's scale (nearest neighbour; -1 stays -1)."""
    return labels if scale == 1.0 else ndi.zoom(labels, scale, order=0)


def annotated_window(train_map: np.ndarray, size: int) -> tuple[slice, slice]:
    """Bounding box of the annotated pixels (>= 0), grown to at least ``size`` per side inside the image."""
    rows, cols = np.nonzero(train_map >= 0)
    out = []
    for coords, n in ((rows, train_map.shape[0]), (cols, train_map.shape[1])):
        lo, extent = int(coords.min()), int(coords.max()) + 1 - int(coords.min())
        length = max(size, extent)
        start = min(max(0, lo - (length - extent) // 2), n - length)
        out.append(slice(start, start + length))
    return out[0], out[1]


def split_heldout(images: list[AnnotatedImage], settings: FinetuneSettings) -> tuple[HeldOut, list[np.ndarray]]:
    """The held-out cells, and the training maps (see :func:`annotation_map`) of the images trained on."""
    if len(images) > 1:
        last = images[-1]
        if not (last.labels > 0).any():
            raise InputError(f"the last image ({last.name!r}) is held out for scoring and needs painted cells")
        heldout = HeldOut(last.name, last.image, np.asarray(last.labels, dtype=np.int32), whole_image=True,
                          annotation=annotation_map(last.labels, last.checked, settings.margin))
        return heldout, [annotation_map(item.labels, item.checked, settings.margin) for item in images[:-1]]
    only = images[0]
    held = np.isin(only.labels, split_cells(only.labels, settings.seed)[1])
    band = max(settings.margin, MIN_HELDOUT_BAND)
    full_map = annotation_map(only.labels, only.checked, settings.margin)
    near = exclude_cells(np.zeros_like(full_map), held, band) < 0  # the held-out cells and their band
    own = np.where(near & ((full_map <= 0) | held), full_map, -1).astype(np.int32)  # other cells: not judged here
    heldout = HeldOut(only.name, only.image, np.where(held, only.labels, 0).astype(np.int32), whole_image=False, annotation=own)
    train_map = annotation_map(np.where(held, 0, only.labels), only.checked, settings.margin)
    return heldout, [exclude_cells(train_map, held, band)]


def training_sample(name: str, image: np.ndarray, train_map: np.ndarray, invert: bool, scale: float) -> Sample:
    """Normalised image and training map at the model's scale."""
    return Sample(name, working_image(image, invert, scale).astype(np.float32), working_labels(train_map, scale).astype(np.int32))


def _windowed(sample: Sample, size: int) -> Sample:
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
    grays = [_check_image(item) for item in images]
    painted = sum(len(np.unique(item.labels[item.labels > 0])) for item in images)
    if painted == 0:
        raise InputError("the annotation has no painted cell: paint some nuclei (label ids > 0) first")
    train_diameter = _train_diameter(Path(teacher_path), Path(student_path))
    invert = detect_invert(grays) if settings.invert is None else settings.invert
    heldout, maps = split_heldout(images, settings)
    train_cells = sum(len(np.unique(m[m > 0])) for m in maps)
    if settings.mode != "distil" and train_cells == 0:
        raise InputError("no painted cell is left for training once the held-out cells are set aside: paint more cells")
    diameter = settings.diameter or median_diameter([Sample(i.name, g, i.labels) for i, g in zip(images, grays)])
    scale = train_diameter / diameter
    smallest = min(min(g.shape) for g in grays) * scale
    if smallest < MIN_CROP:
        raise InputError(f"the images are too small: {smallest:.0f} px per side once nuclei of {diameter:.1f} px are "
                         f"rescaled to the model's {train_diameter:.1f} px; need at least {MIN_CROP}")
    if settings.mode == "distil":
        maps = [np.full_like(m, -1) for m in maps]
    train = [training_sample(f"{i}:{item.name}", item.image, m, invert, scale) for i, (item, m) in enumerate(zip(images, maps))]
    crop = min([settings.crop] + [min(s.image.shape) for s in train]) // ALIGN * ALIGN
    whole = train
    if settings.mode != "distil":
        train = [_windowed(s, crop) for s in train]
    student_train = whole if settings.mode == "teacher" else train
    return FinetunePlan(settings, Path(teacher_path), Path(student_path), train, student_train, heldout, painted, train_cells,
                        float(diameter), train_diameter, invert, crop)
