"""Running a fine-tuning plan: score, train, score again and save new checkpoints."""
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

from ...affinity import Offsets
from ...data import AugmentConfig, Sample
from ...decode.mws import DecodeSettings
from ...decode.policy import decode_output
from ...evaluation import tune_decoder
from ...inference import NetworkOutput, network_output
from ...io.checkpoint import load_checkpoint, save_checkpoint
from ...models import EmbeddingUNet
from ...segment import ModelSegmenter, segment_any
from ..distill import DistillSettings, distill_samples, with_pseudo_labels
from ..loop import TrainSettings, run_training, segmentation_batches, segmentation_loss
from ..volumes import make_volume_batch
from .plan import FinetunePlan, working_input, working_labels
from .rules import annotation_scores, heldout_metrics, pseudo_instances

RETUNE_GRID = {"foreground_threshold": (0.4, 0.5, 0.6), "min_size": (20, 40, 80), "attractive_bias": (0.15, 0.3, 0.5)}
RETUNE_GRID_3D = dict(RETUNE_GRID, min_size=(100, 1000, 3000))  # 3D models: voxels, the range the 3D benchmark searches
SCALE_RANGE = (0.8, 1.25)  # the teacher's crops with FinetuneSettings.scale_augment
MIN_RETUNE_HELDOUT = 10  # fewer held-out cells than this: the decoder is re-tuned on the training cells

DEFAULT_FOLDER = Path("~/.napari-graphkd/models")

Progress = Callable[[dict[str, Any]], None]
StopCheck = Callable[[], bool]


@dataclass
class FinetuneResult:
    """New checkpoints (none when cancelled) and held-out scores before and after."""

    mode: str
    saved: dict[str, Path] = field(default_factory=dict)  # role -> new checkpoint
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # role -> before/after -> metrics
    heldout: str = ""
    cancelled: bool = False
    decode_tuned_on: str = ""  # "held-out cells" or "training cells"


def decode_working(model: EmbeddingUNet, image: np.ndarray, settings: DecodeSettings, offsets: Offsets | None = None) -> np.ndarray:
    """Instances of an image (or volume) already at the model's scale (a training sample); ``offsets``: a 3D model's."""
    output = network_output(model, image, offsets=offsets)
    return decode_output(output, settings, output.offsets)[0]


def heldout_scores(model: EmbeddingUNet, meta: dict[str, Any], plan: FinetunePlan) -> dict[str, float]:
    """Held-out scores of a model run exactly as the Segment widget runs it (diameter, inversion, voxel size, its decoder)."""
    segmenter = ModelSegmenter(model=model, metadata=dict(meta, train_diameter=plan.train_diameter))
    pred = segment_any(segmenter, plan.heldout.image, diameter=plan.diameter, invert=plan.invert, channel="luminance",
                       voxel_size=plan.voxel_size).labels
    return heldout_metrics(plan.heldout.cells, pred)


def retune_cells(plan: FinetunePlan) -> tuple[str, list[Sample]]:
    """Which painted cells the decoder is re-tuned on, as samples at the model's scale (labels: annotation maps).

    The held-out cells when there are at least :data:`MIN_RETUNE_HELDOUT` (or no painted cell is trained on,
    as in ``distil`` mode), else the training cells. Labels follow :func:`annotation_map` (ids, 0 checked
    background, -1 not annotated), so predictions on checked background count as false positives.
    """
    held = plan.heldout.cells
    train = [s for s in plan.train if (s.labels > 0).any()]
    if len(np.unique(held[held > 0])) >= MIN_RETUNE_HELDOUT or not train:
        image = working_input(plan.heldout.image, plan.invert, plan.scale, volume=plan.ndim == 3)
        labels = working_labels(plan.heldout.annotation, plan.scale).astype(np.int32)
        return "held-out cells", [Sample(plan.heldout.name, image, labels)]
    return "training cells", train


def painted_cell_scores(outputs: list[NetworkOutput], samples: list[Sample], settings: DecodeSettings) -> dict[str, float]:
    """Mean :func:`annotation_scores` of the samples' painted cells; ``score`` = F1@0.5 + AJI (judged predictions)."""
    per = [annotation_scores(s.labels, decode_output(o, settings, o.offsets)[0]) for o, s in zip(outputs, samples)]
    mean = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
    return dict(mean, score=mean["f1@0.5"] + mean["aji"])


def retune_decoder(model: EmbeddingUNet, meta: dict[str, Any], samples: list[Sample], offsets: Offsets | None = None) -> DecodeSettings:
    """Decoder settings (threshold, min size, bias) that best segment the painted cells of ``samples``: the best of the grid
    for images; for volumes (``offsets``: the model's), each setting in turn, every 3D decode costing seconds."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        outputs = [network_output(model, s.image, offsets=offsets) for s in samples]
    model.train(was_training)
    base = DecodeSettings(**meta.get("decode", {}))
    if samples[0].image.ndim == 2:
        return tune_decoder(outputs, samples, base, RETUNE_GRID, score=painted_cell_scores)[0]
    for key, values in RETUNE_GRID_3D.items():  # volumes: one setting at a time, given the ones before (9 decodes, not 27)
        base = tune_decoder(outputs, samples, base, {key: values}, score=painted_cell_scores)[0]
    return base


def train_settings(plan: FinetunePlan, role: str = "student") -> TrainSettings:
    """Short fine-tuning schedule of one role: saved once at the end, no snapshots; scale augmentation as set.

    3D models train in float32 (see :func:`..loop.training_autocast`); their (z, y, x) crop is ``plan.crop``.
    """
    s = plan.settings
    steps, lr = (s.teacher_steps, s.teacher_lr) if role == "teacher" else (s.steps, s.lr)
    scales = SCALE_RANGE if (role == "teacher" and s.scale_augment) else None
    side = plan.crop if isinstance(plan.crop, int) else max(plan.crop[1:])
    return TrainSettings(steps=steps, batch_size=s.batch_size, lr=lr, warmup=min(20, max(1, steps // 10)),
                         seed=s.seed, save_every=steps, snapshot_every=10**9, validate_every=10**9,
                         augment=AugmentConfig(crop=side, scale_range=scales))


def freeze_encoder(model: EmbeddingUNet) -> None:
    """Keep the encoder's weights (stem and down blocks) fixed: only the decoder and heads train."""
    for module in (model.stem, model.down):
        for p in module.parameters():
            p.requires_grad_(False)


def save_new_checkpoint(model: EmbeddingUNet, metadata: dict[str, Any], folder: str | Path, stem: str) -> Path:
    """Save as ``folder/stem.safetensors`` or the first free ``stem-2``, ``stem-3``...: atomic, never overwrites."""
    folder = Path(folder).expanduser()
    names = (folder / (f"{stem}.safetensors" if n == 1 else f"{stem}-{n}.safetensors") for n in itertools.count(1))
    return _save_first_free(model, metadata, folder, names)


def save_checkpoint_as(model: EmbeddingUNet, metadata: dict[str, Any], path: str | Path) -> Path:
    """Save as exactly ``path``: atomic; FileExistsError if it exists (never overwrites)."""
    path = Path(path).expanduser()
    return _save_first_free(model, metadata, path.parent, iter([path]))


def _save_first_free(model: EmbeddingUNet, metadata: dict[str, Any], folder: Path, names) -> Path:
    """Write a partial file in ``folder``, then hard-link it to the first of ``names`` that does not exist."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{uuid.uuid4().hex}.partial"
    save_checkpoint(partial, model, metadata)
    try:
        for path in names:
            try:
                os.link(partial, path)  # fails if the name exists: no race with another writer
                return path
            except FileExistsError:
                last = path
        raise FileExistsError(f"{last} exists; checkpoints are never overwritten")
    finally:
        partial.unlink()


def _relay(phase: str, on_progress: Progress) -> Progress:
    """run_training's per-step records as ``{"phase", "done", "total", "loss"}``."""
    return lambda r: on_progress({"phase": phase, "done": r["step"], "total": r["total"], "loss": r["loss"]})


def _teacher_batches(samples: list[Sample], settings: TrainSettings, plan: FinetunePlan):
    """Batch factory of the teacher's augmented crops: squares of images, or ``plan.crop`` (z, y, x) crops of volumes."""
    if plan.ndim == 3:
        return lambda rng: make_volume_batch(samples, settings.batch_size, settings.augment, plan.crop, rng)
    return segmentation_batches(samples, settings)


def _train_teacher(teacher: EmbeddingUNet, plan: FinetunePlan, on_progress: Progress, should_stop: StopCheck) -> bool:
    """Fine-tune the teacher on the annotated pixels (segmentation loss only); False if stopped."""
    settings = train_settings(plan, "teacher")
    if plan.settings.teacher_layers == "decoder":
        freeze_encoder(teacher)

    def step_loss(net: EmbeddingUNet, batch):
        images, labels = batch
        emb, fg = net(torch.from_numpy(images))
        return segmentation_loss(emb, fg, labels, settings.foreground_weight, offsets=plan.offsets)

    with tempfile.TemporaryDirectory(prefix="graphkd-teacher-") as run_dir:
        annotated = [s for s in plan.train if (s.labels >= 0).any()]  # unpainted images teach the student only
        progress = run_training(teacher, _teacher_batches(annotated, settings, plan), Path(run_dir), settings,
                                step_loss=step_loss, metadata={}, on_progress=_relay("training teacher", on_progress),
                                should_stop=should_stop)
    return progress["step"] == settings.steps


def _with_teacher_instances(teacher: EmbeddingUNet, meta: dict[str, Any], plan: FinetunePlan,
                            on_progress: Progress) -> list[Sample]:
    """Training samples whose unannotated pixels carry the teacher's instances (pseudo-labels for IGD)."""
    out = []
    for i, s in enumerate(plan.student_train):
        instances = decode_working(teacher, s.image, DecodeSettings(**meta.get("decode", {})), plan.offsets)
        out.append(Sample(s.name, s.image, with_pseudo_labels(s.labels, pseudo_instances(instances, s.labels))))
        on_progress({"phase": "teacher pseudo-labels", "done": i + 1, "total": len(plan.student_train), "loss": None})
    return out


def _train_student(student: EmbeddingUNet, teacher: EmbeddingUNet, samples: list[Sample], plan: FinetunePlan,
                   on_progress: Progress, should_stop: StopCheck) -> bool:
    """Graph distillation from the teacher (+ segmentation loss unless ``distil``); False if stopped."""
    settings = train_settings(plan)
    distill = DistillSettings(segmentation_weight=0.0 if plan.settings.mode == "distil" else 1.0)
    with tempfile.TemporaryDirectory(prefix="graphkd-student-") as run_dir:
        progress = distill_samples(teacher, student, samples, run_dir, settings, distill, metadata={},
                                   on_progress=_relay("training student", on_progress), should_stop=should_stop,
                                   offsets=plan.offsets, crop=plan.crop if plan.ndim == 3 else None)
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
        "diameter": plan.diameter, "scale": plan.scale, "voxel_size": plan.voxel_size, "settings": asdict(plan.settings),
        "heldout_scores": result.scores[role], "decode_tuned_on": result.decode_tuned_on,
        "time": datetime.now().isoformat(timespec="seconds"), **extra,
    }
    keep = {k: base[k] for k in ("decode", "distillation", "voxel_size", "offsets") if k in base}  # a 3D model's geometry
    return dict(keep, name=f"{base.get('name') or role} ({plan.settings.mode})", train_diameter=plan.train_diameter,
                input=dict(base.get("input", {}), invert=plan.invert), finetune=record)


STEMS = {"distil": {"student": "student-distilled"}, "finetune": {"student": "student-finetuned"},
         "teacher": {"teacher": "teacher-finetuned", "student": "student-redistilled"}}


def run_finetune(plan: FinetunePlan, folder: str | Path = DEFAULT_FOLDER, *, on_progress: Progress = lambda record: None,
                 should_stop: StopCheck = lambda: False, targets: dict[str, Path] | None = None) -> FinetuneResult:
    """Score, train, score again and save new checkpoints; the input checkpoint files are never touched.

    New checkpoints go to ``folder`` under free names, or to exactly ``targets[role]`` when given
    (FileExistsError if one exists by then).

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
    result.decode_tuned_on, tune_samples = retune_cells(plan)

    def retune(role: str) -> None:
        model, meta = models[role]
        models[role] = (model, dict(meta, decode=retune_decoder(model, meta, tune_samples, plan.offsets).to_dict()))
        on_progress({"phase": "re-tuning the decoder", "done": roles.index(role) + 1, "total": len(roles), "loss": None})

    if plan.settings.mode == "teacher":
        if not _train_teacher(teacher, plan, on_progress, should_stop):
            result.cancelled = True
            return result
        retune("teacher")  # its pseudo-labels for the student use its re-tuned decoder
    if should_stop() or not _train_student(student, teacher, _with_teacher_instances(*models["teacher"], plan, on_progress),
                                           plan, on_progress, should_stop):
        result.cancelled = True
        return result
    retune("student")
    for i, role in enumerate(roles):
        result.scores[role]["after"] = heldout_scores(*models[role], plan)
        on_progress({"phase": "scoring after", "done": i + 1, "total": len(roles), "loss": None})
    for role in roles:
        extra = {"teacher": {"path": str(result.saved.get("teacher", plan.teacher_path))}} if role == "student" else {}
        meta = _metadata(role, models[role][1], plan, result, extra)
        result.saved[role] = (save_checkpoint_as(models[role][0], meta, targets[role]) if targets else
                              save_new_checkpoint(models[role][0], meta, folder, STEMS[plan.settings.mode][role]))
    return result
