"""Fine-tuning and distillation on a user's own, partially annotated images, all in memory.

Three modes: ``distil`` (the student learns from the teacher only), ``finetune`` (the student
learns from the annotation plus graph distillation from the teacher) and ``teacher`` (the
teacher is fine-tuned on the annotation, then the student is fine-tuned from the new teacher).

Annotation rules (METHOD.md A.5):

* every painted id > 0 is one cell;
* checked background: unpainted pixels within ``margin`` px of a painted cell, and every
  unpainted pixel inside a checked region (e.g. the user's rectangles);
* every other pixel is not annotated (-1 in the training map): every loss ignores it, it is
  never taught as background. There, the teacher's decoded nuclei that lie wholly in
  unannotated pixels are pseudo-instances for the graph (IGD) terms;
* held-out cells: with one image, a fifth of the painted cells (at least one, fixed seed), plus
  a band of ``max(margin, 4)`` px around them, are left out of training; with several images, the
  last image is left out entirely. Before/after scores are measured on the held-out cells only.

Images go through the same input rules as inference (grayscale, optional inversion, percentile
normalisation) and are rescaled so that nuclei have the model's training diameter.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy import ndimage as ndi

from ..data import AugmentConfig, Sample, median_diameter
from ..decode.mws import DecodeSettings
from ..evaluation import prepared_output
from ..inference import decode_output, prepare_image, run_network
from ..io.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from ..metrics import aji, match_instances, overlaps
from ..models import EmbeddingUNet
from ..preprocess import InputError, to_grayscale
from ..segment import DEFAULT_TRAIN_DIAMETER
from .distill import ALIGN, DistillSettings, distill_samples, with_pseudo_labels
from .loop import TrainSettings, run_training, segmentation_batches, segmentation_loss

MODES: dict[str, str] = {
    "distil": "Distil the student from the teacher",
    "finetune": "Fine-tune the student with my annotation",
    "teacher": "Fine-tune the teacher, then re-distil the student",
}
DEFAULT_FOLDER = Path("~/.napari-graphkd/models")
HELDOUT_FRACTION = 5  # one painted cell in five is held back
MIN_HELDOUT_BAND = 4
MIN_CROP = 64
SCORE_KEYS = {"recall@0.5": "recall@0.5", "mean_iou": "mean IoU", "aji": "AJI"}

Progress = Callable[[dict[str, Any]], None]
StopCheck = Callable[[], bool]


@dataclass(frozen=True)
class AnnotatedImage:
    """One image (gray or RGB) with its partial annotation: painted ids > 0 and optional checked regions."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    checked: np.ndarray | None = None  # (H,W) bool: inside, unpainted pixels are background


@dataclass(frozen=True)
class FinetuneSettings:
    """What is trained and how long; the rest follows the library's training defaults."""

    mode: str = "finetune"
    steps: int = 300
    batch_size: int = 4
    crop: int = 256
    lr: float = 1e-3
    margin: int = 8
    diameter: float | None = None  # nucleus diameter in the user's images (px); None: measure the painted cells
    invert: bool | None = None  # dark nuclei on a bright background; None: the model's default
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.steps < 1 or self.batch_size < 1 or self.margin < 0 or self.crop < MIN_CROP:
            raise ValueError("steps and batch_size must be >= 1, margin >= 0 and crop >= 64")


@dataclass(frozen=True)
class HeldOut:
    """The held-out cells (original ids, 0 elsewhere) of one image at its original size."""

    name: str
    image: np.ndarray
    cells: np.ndarray
    whole_image: bool

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


@dataclass
class FinetuneResult:
    """New checkpoints (none when cancelled) and held-out scores before and after."""

    mode: str
    saved: dict[str, Path] = field(default_factory=dict)  # role -> new checkpoint
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # role -> before/after -> metrics
    heldout: str = ""
    cancelled: bool = False


# -- annotation rules --------------------------------------------------------------------------


def annotation_map(labels: np.ndarray, checked: np.ndarray | None = None, margin: int = 8) -> np.ndarray:
    """Training map of a partial annotation: painted ids, 0 for checked background, -1 elsewhere."""
    painted = labels > 0
    background = ndi.distance_transform_edt(~painted) <= margin if painted.any() else np.zeros_like(painted)
    if checked is not None:
        background |= checked
    out = np.where(background, 0, -1).astype(np.int32)
    out[painted] = labels[painted]
    return out


def split_cells(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, held-out ids) of the painted cells: a fifth (at least one) held out, by a fixed seed."""
    ids = np.unique(labels[labels > 0])
    held = np.random.default_rng(seed).permutation(ids)[: max(1, len(ids) // HELDOUT_FRACTION)]
    return np.setdiff1d(ids, held), np.sort(held)


def exclude_cells(train_map: np.ndarray, cells: np.ndarray, band: int) -> np.ndarray:
    """``train_map`` with ``cells`` (a mask) and a band of ``band`` px around them set to -1 (not annotated)."""
    near = ndi.distance_transform_edt(~cells) <= band if cells.any() else cells
    return np.where(near, -1, train_map).astype(np.int32)


def pseudo_instances(teacher_labels: np.ndarray, train_map: np.ndarray) -> np.ndarray:
    """The teacher's instances lying wholly in unannotated pixels (the others dropped)."""
    touched = np.unique(teacher_labels[train_map >= 0])
    return np.where(np.isin(teacher_labels, touched), 0, teacher_labels)


def heldout_metrics(cells: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Scores on held-out cells only, since nobody annotated the rest of the image.

    ``recall@0.5``: fraction of held-out cells matched (one to one) by a predicted instance with
    IoU >= 0.5; ``mean_iou``: mean over held-out cells of their best IoU with any prediction (0 if
    none overlaps); ``aji``: AJI of the held-out cells against the predicted instances overlapping
    them (predictions elsewhere cannot be judged, so they do not count).
    """
    ov = overlaps(cells, pred)
    if ov.n_gt == 0:
        raise ValueError("no held-out cell to score")
    best = ov.iou().max(axis=1) if ov.n_pred else np.zeros(ov.n_gt)
    near = np.setdiff1d(np.unique(pred[cells > 0]), [0])
    return {
        "recall@0.5": match_instances(cells, pred, 0.5).tp / ov.n_gt,
        "mean_iou": float(best.mean()),
        "aji": aji(cells, np.where(np.isin(pred, near), pred, 0)),
        "cells": float(ov.n_gt),
    }


# -- planning (cheap, validates everything before a job starts) --------------------------------


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


def _model_facts(teacher_path: Path, student_path: Path, invert: bool | None) -> tuple[float, bool]:
    """(training diameter, inversion) shared by teacher and student, from their metadata."""
    t_meta, s_meta = read_metadata(teacher_path), read_metadata(student_path)
    t_d = float(t_meta.get("train_diameter", DEFAULT_TRAIN_DIAMETER))
    s_d = float(s_meta.get("train_diameter", DEFAULT_TRAIN_DIAMETER))
    if abs(t_d - s_d) > 0.5:
        raise InputError(f"teacher and student were trained for different nucleus diameters ({t_d:.1f} vs {s_d:.1f} px)")
    return s_d, (bool(s_meta.get("input", {}).get("invert", False)) if invert is None else invert)


def working_image(image: np.ndarray, invert: bool, scale: float) -> np.ndarray:
    """Normalised image at the model's scale, exactly as inference prepares it."""
    prepared = prepare_image(image, invert=invert)
    return prepared if scale == 1.0 else ndi.zoom(prepared, scale, order=1)


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
        heldout = HeldOut(last.name, last.image, np.asarray(last.labels, dtype=np.int32), whole_image=True)
        return heldout, [annotation_map(item.labels, item.checked, settings.margin) for item in images[:-1]]
    only = images[0]
    held = np.isin(only.labels, split_cells(only.labels, settings.seed)[1])
    heldout = HeldOut(only.name, only.image, np.where(held, only.labels, 0).astype(np.int32), whole_image=False)
    train_map = annotation_map(np.where(held, 0, only.labels), only.checked, settings.margin)
    return heldout, [exclude_cells(train_map, held, max(settings.margin, MIN_HELDOUT_BAND))]


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
    """
    if not images:
        raise InputError("choose at least one image with its annotation")
    grays = [_check_image(item) for item in images]
    painted = sum(len(np.unique(item.labels[item.labels > 0])) for item in images)
    if painted == 0:
        raise InputError("the annotation has no painted cell: paint some nuclei (label ids > 0) first")
    train_diameter, invert = _model_facts(Path(teacher_path), Path(student_path), settings.invert)
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
    if settings.mode != "distil":
        train = [_windowed(s, crop) for s in train]
    return FinetunePlan(settings, Path(teacher_path), Path(student_path), train, heldout, painted, train_cells,
                        float(diameter), train_diameter, invert, crop)


# -- running -----------------------------------------------------------------------------------


def decode_working(model: EmbeddingUNet, image: np.ndarray, settings: DecodeSettings) -> np.ndarray:
    """Instances of an already normalised, rescaled image."""
    return decode_output(prepared_output(model, image), settings)[0]


def heldout_scores(model: EmbeddingUNet, meta: dict[str, Any], plan: FinetunePlan) -> dict[str, float]:
    """Held-out scores of a model run exactly as the Segment widget runs it (diameter, inversion, its decoder)."""
    out = run_network(model, plan.heldout.image, invert=plan.invert, diameter=plan.diameter,
                      train_diameter=plan.train_diameter)
    pred, _ = decode_output(out, DecodeSettings(**meta.get("decode", {})))
    return heldout_metrics(plan.heldout.cells, pred)


def train_settings(plan: FinetunePlan) -> TrainSettings:
    """Short fine-tuning schedule: saved once at the end, no snapshots, no scale augmentation."""
    s = plan.settings
    return TrainSettings(steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup=min(20, max(1, s.steps // 10)),
                         seed=s.seed, save_every=s.steps, snapshot_every=10**9, validate_every=10**9,
                         augment=AugmentConfig(crop=plan.crop, scale_range=None))


def save_new_checkpoint(model: EmbeddingUNet, metadata: dict[str, Any], folder: str | Path, stem: str) -> Path:
    """Save as ``folder/stem.safetensors`` or the first free ``stem-2``, ``stem-3``...: atomic, never overwrites."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{stem}.{uuid.uuid4().hex}.partial"
    save_checkpoint(partial, model, metadata)
    try:
        for n in itertools.count(1):
            path = folder / (f"{stem}.safetensors" if n == 1 else f"{stem}-{n}.safetensors")
            try:
                os.link(partial, path)  # fails if the name exists: no race with another writer
                return path
            except FileExistsError:
                continue
    finally:
        partial.unlink()


def _relay(phase: str, on_progress: Progress) -> Progress:
    """run_training's per-step records as ``{"phase", "done", "total", "loss"}``."""
    return lambda r: on_progress({"phase": phase, "done": r["step"], "total": r["total"], "loss": r["loss"]})


def _train_teacher(teacher: EmbeddingUNet, plan: FinetunePlan, on_progress: Progress, should_stop: StopCheck) -> bool:
    """Fine-tune the teacher on the annotated pixels (segmentation loss only); False if stopped."""
    settings = train_settings(plan)

    def step_loss(net: EmbeddingUNet, batch):
        images, labels = batch
        emb, fg = net(torch.from_numpy(images))
        return segmentation_loss(emb, fg, labels, settings.foreground_weight)

    with tempfile.TemporaryDirectory(prefix="graphkd-teacher-") as run_dir:
        progress = run_training(teacher, segmentation_batches(plan.train, settings), Path(run_dir), settings,
                                step_loss=step_loss, metadata={}, on_progress=_relay("training teacher", on_progress),
                                should_stop=should_stop)
    return progress["step"] == settings.steps


def _with_teacher_instances(teacher: EmbeddingUNet, meta: dict[str, Any], plan: FinetunePlan,
                            on_progress: Progress) -> list[Sample]:
    """Training samples whose unannotated pixels carry the teacher's instances (pseudo-labels for IGD)."""
    out = []
    for i, s in enumerate(plan.train):
        instances = decode_working(teacher, s.image, DecodeSettings(**meta.get("decode", {})))
        out.append(Sample(s.name, s.image, with_pseudo_labels(s.labels, pseudo_instances(instances, s.labels))))
        on_progress({"phase": "teacher pseudo-labels", "done": i + 1, "total": len(plan.train), "loss": None})
    return out


def _train_student(student: EmbeddingUNet, teacher: EmbeddingUNet, samples: list[Sample], plan: FinetunePlan,
                   on_progress: Progress, should_stop: StopCheck) -> bool:
    """Graph distillation from the teacher (+ segmentation loss unless ``distil``); False if stopped."""
    settings = train_settings(plan)
    distill = DistillSettings(segmentation_weight=0.0 if plan.settings.mode == "distil" else 1.0)
    with tempfile.TemporaryDirectory(prefix="graphkd-student-") as run_dir:
        progress = distill_samples(teacher, student, samples, run_dir, settings, distill, metadata={},
                                   on_progress=_relay("training student", on_progress), should_stop=should_stop)
    return progress["step"] == settings.steps


def _digest(path: Path) -> str:
    """First 16 hex digits of a file's SHA-256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _metadata(role: str, base: dict[str, Any], plan: FinetunePlan, result: FinetuneResult, extra: dict) -> dict[str, Any]:
    """Metadata of a new checkpoint: what it came from, on which data, and its held-out scores."""
    path = plan.teacher_path if role == "teacher" else plan.student_path
    record = {
        "mode": plan.settings.mode, "base": {"path": str(path), "sha256_16": _digest(path), "name": base.get("name")},
        "images": [s.name for s in plan.train], "heldout": result.heldout, "train_cells": plan.train_cells,
        "diameter": plan.diameter, "scale": plan.scale, "settings": asdict(plan.settings),
        "heldout_scores": result.scores[role],
        "time": datetime.now().isoformat(timespec="seconds"), **extra,
    }
    keep = {k: base[k] for k in ("decode", "distillation") if k in base}
    return dict(keep, name=f"{base.get('name') or role} ({plan.settings.mode})", train_diameter=plan.train_diameter,
                input=dict(base.get("input", {}), invert=plan.invert), finetune=record)


STEMS = {"distil": {"student": "student-distilled"}, "finetune": {"student": "student-finetuned"},
         "teacher": {"teacher": "teacher-finetuned", "student": "student-redistilled"}}


def run_finetune(plan: FinetunePlan, folder: str | Path = DEFAULT_FOLDER, *, on_progress: Progress = lambda record: None,
                 should_stop: StopCheck = lambda: False) -> FinetuneResult:
    """Score, train, score again and save new checkpoints; the input checkpoint files are never touched.

    ``on_progress`` gets ``{"phase", "done", "total", "loss"}`` records; when ``should_stop()``
    turns true the run ends after the current step, saves nothing and returns ``cancelled``.
    """
    teacher, t_meta = load_checkpoint(plan.teacher_path)
    student, s_meta = load_checkpoint(plan.student_path)
    models = {"teacher": (teacher, t_meta), "student": (student, s_meta)}
    roles = list(STEMS[plan.settings.mode])
    result = FinetuneResult(plan.settings.mode, heldout=plan.heldout.describe(plan.painted_cells))
    for i, role in enumerate(roles):
        result.scores[role] = {"before": heldout_scores(*models[role], plan)}
        on_progress({"phase": "scoring before", "done": i + 1, "total": len(roles), "loss": None})
    finished = plan.settings.mode != "teacher" or _train_teacher(teacher, plan, on_progress, should_stop)
    finished = finished and not should_stop() and _train_student(
        student, teacher, _with_teacher_instances(teacher, t_meta, plan, on_progress), plan, on_progress, should_stop)
    if not finished:
        result.cancelled = True
        return result
    for i, role in enumerate(roles):
        result.scores[role]["after"] = heldout_scores(*models[role], plan)
        on_progress({"phase": "scoring after", "done": i + 1, "total": len(roles), "loss": None})
    for role in roles:
        extra = {"teacher": {"path": str(result.saved.get("teacher", plan.teacher_path))}} if role == "student" else {}
        meta = _metadata(role, models[role][1], plan, result, extra)
        result.saved[role] = save_new_checkpoint(models[role][0], meta, folder, STEMS[plan.settings.mode][role])
    return result


# -- reporting ---------------------------------------------------------------------------------


def scores_table(scores: dict[str, dict[str, dict[str, float]]]) -> str:
    """Before/after held-out scores of each role as a fixed-width text table."""
    lines = [f"{'held-out cells':<15}" + "".join(f"{title:>11}" for title in SCORE_KEYS.values())]
    for role, by_time in scores.items():
        for when, values in by_time.items():
            lines.append(f"{role + ' ' + when:<15}" + "".join(f"{values[k]:>11.3f}" for k in SCORE_KEYS))
    return "\n".join(lines)


def finetune_report(result: FinetuneResult, plan: FinetunePlan) -> str:
    """What was held out, the before/after table, and where the new checkpoints are."""
    lines = [f"{MODES[result.mode]}: {plan.train_cells} cells for training; {result.heldout}",
             f"nuclei of {plan.diameter:.1f} px rescaled to {plan.train_diameter:.1f} px"
             f" (use diameter {plan.diameter:.1f} in the Segment widget)", scores_table(result.scores)]
    if result.cancelled:
        lines.append("cancelled: nothing saved, the models are unchanged")
    lines += [f"saved {role}: {path}" for role, path in result.saved.items()]
    return "\n".join(lines)
