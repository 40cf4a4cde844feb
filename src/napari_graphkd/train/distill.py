"""Distilling a student from a frozen teacher whose outputs are computed once and cached.

The teacher's embedding (and, for feature baselines, its decoder features) is computed once per
training image (docs/method.md, "Benchmark protocol"). Each step crops the same window from image, labels and cached
teacher maps, applies the same flips/rotations to all of them, and jitters the intensities of
the student's input only. Crop origins are multiples of 16 so cached coarse features stay
aligned. There is no scale augmentation here (it would need the teacher re-run); every student
row of the benchmark (no-KD included) uses this same pipeline.

Label maps follow the partial-annotation convention (< 0 = not annotated, ignored by the
segmentation loss). An unannotated pixel may also carry a pseudo-instance (e.g. one of the
teacher's decoded nuclei) for the graph terms: pseudo-instance k is stored as -1-k
(:func:`with_pseudo_labels`, read back by :func:`graph_labels`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open

from ..data import Sample, jitter_intensity, load_train_tune
from ..affinity import embedding_affinities
from ..distill import DistillationObjective, DistillWeights, MemoryBank, NetOut, make_adapter, method_weights
from ..inference import TRAIN_DIAMETER
from ..io.checkpoint import atomic_save_tensors, load_checkpoint
from ..models import EmbeddingUNet, build_model
from . import distributed
from .loop import TrainSettings, run_training, segmentation_loss

ALIGN = 16


@dataclass
class TeacherTargets:
    """Cached teacher outputs for one training image (float16)."""

    embedding: torch.Tensor  # (C,H,W)
    features: list[torch.Tensor]  # decoder stages at the padded image's scales, coarse to fine


@dataclass
class DistillBatch:
    """One distillation step's inputs and targets."""

    images: torch.Tensor  # (B,1,S,S) student input
    labels: np.ndarray  # (B,S,S) instance labels, < 0 = not annotated
    teacher: NetOut  # cached teacher embedding (B,C,S,S) and features
    image_ids: list[str]


@dataclass
class DistillSettings:
    """What is distilled: method, term weights and memory bank."""

    method: str = "grd"
    weights: DistillWeights = field(default_factory=lambda: method_weights("grd"))
    memory_size: int = 32
    memory_samples: int = 12
    segmentation_weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly settings for checkpoint metadata."""
        return asdict(self)


def with_pseudo_labels(labels: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    """``labels`` whose unannotated pixels inside a pseudo-instance carry it as -1-k (ids shifted past the annotated ones)."""
    shifted = pseudo.astype(np.int64) + max(int(labels.max(initial=0)), 0)
    return np.where((labels < 0) & (pseudo > 0), -1 - shifted, labels).astype(np.int32)


def graph_labels(labels: np.ndarray) -> np.ndarray:
    """Instance ids for the graph terms: annotated ids, pseudo-instances (-1-k -> k), 0 for the rest."""
    return np.where(labels < 0, -1 - labels, labels)


@torch.inference_mode()
def compute_teacher_targets(teacher: EmbeddingUNet, samples: list[Sample], with_features: bool,
                            on_image: Callable[[int, int], None] | None = None) -> list[TeacherTargets]:
    """Teacher embedding (and decoder features) of every sample, computed once, stored as float16."""
    teacher.eval()
    targets = []
    for i, s in enumerate(samples):
        x = torch.from_numpy(s.image)[None, None]
        emb, _, feats = teacher.forward_padded(x)
        keep = [f[0].half() for f in feats] if with_features else []
        targets.append(TeacherTargets(emb[0].half(), keep))
        if on_image is not None:
            on_image(i + 1, len(samples))
    return targets


def save_teacher_targets(targets: list[TeacherTargets], names: list[str], path: Path) -> None:
    """Write cached teacher outputs (with the image names they belong to) atomically to one safetensors file."""
    tensors = {}
    for i, t in enumerate(targets):
        tensors[f"{i}/embedding"] = t.embedding
        tensors.update({f"{i}/feature{j}": f for j, f in enumerate(t.features)})
    atomic_save_tensors(tensors, path, {"names": json.dumps(names)}, overwrite=True)


def load_teacher_targets(path: Path, names: list[str], with_features: bool) -> list[TeacherTargets] | None:
    """Cached teacher outputs from :func:`save_teacher_targets`, or None if the file is absent or for other images."""
    if not path.exists():
        return None
    with safe_open(path, "pt") as f:
        if json.loads((f.metadata() or {}).get("names", "[]")) != names:
            return None
        n_features = sum(k.startswith("0/feature") for k in f.keys()) if with_features else 0  # same for every image
        if with_features and n_features == 0:
            return None
        return [TeacherTargets(f.get_tensor(f"{i}/embedding"), [f.get_tensor(f"{i}/feature{j}") for j in range(n_features)])
                for i in range(len(names))]


def _crop_and_turn(t: torch.Tensor, y: int, x: int, size: int, scale: int, k: int, flip: bool) -> torch.Tensor:
    """Crop a (…,H,W) map at a 1/scale resolution, then rotate by k*90° and optionally flip."""
    y0, x0, s = y // scale, x // scale, size // scale
    out = torch.rot90(t[..., y0 : y0 + s, x0 : x0 + s], k, dims=(-2, -1))
    return torch.flip(out, dims=(-1,)) if flip else out


def distill_batches(samples: list[Sample], targets: list[TeacherTargets], settings: TrainSettings):
    """Batch factory of aligned (image, labels, teacher maps) crops with shared geometric augmentation."""
    size = settings.augment.crop
    if size % ALIGN:
        raise ValueError(f"distillation crop size must be a multiple of {ALIGN}")

    def make(rng: np.random.Generator) -> DistillBatch:
        images, labels, embs, feats, ids = [], [], [], [], []
        for i in rng.integers(0, len(samples), settings.batch_size):
            s, t = samples[i], targets[i]
            h, w = s.image.shape
            if h < size or w < size:
                raise ValueError(f"image {s.name} ({h}x{w}) is smaller than the crop size {size}")
            y = int(rng.integers(0, (h - size) // ALIGN + 1)) * ALIGN
            x = int(rng.integers(0, (w - size) // ALIGN + 1)) * ALIGN
            k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
            img = _crop_and_turn(torch.from_numpy(s.image), y, x, size, 1, k, flip).numpy()
            images.append(jitter_intensity(img, settings.augment, rng))
            labels.append(_crop_and_turn(torch.from_numpy(s.labels), y, x, size, 1, k, flip).numpy())
            embs.append(_crop_and_turn(t.embedding, y, x, size, 1, k, flip))
            padded_h = t.features[-1].shape[-2] if t.features else h
            feats.append([_crop_and_turn(f, y, x, size, padded_h // f.shape[-2], k, flip) for f in t.features])
            ids.append(s.name)
        teacher = NetOut(torch.stack(embs).float(), [torch.stack(level).float() for level in zip(*feats)])
        x_in = torch.from_numpy(np.stack(images)[:, None])
        return DistillBatch(x_in, np.stack(labels), teacher, ids)

    return make


def distill_samples(
    teacher: EmbeddingUNet,
    student: EmbeddingUNet,
    train: list[Sample],
    run_dir: str | Path,
    settings: TrainSettings,
    distill: DistillSettings,
    *,
    metadata: dict[str, Any],
    validate: Callable[[EmbeddingUNet], dict[str, float]] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_status: Callable[[str], None] = lambda message: None,
    should_stop: Callable[[], bool] = lambda: False,
    targets_file: Path | None = None,
) -> dict[str, Any]:
    """Distil ``student`` from a frozen ``teacher`` on in-memory samples (labels: see :func:`graph_labels`).

    ``targets_file`` caches the teacher's outputs on disk so that runs on the same teacher and images
    (a benchmark's rows) compute them once; the caller keeps one file per teacher and data folder.
    """
    for p in teacher.parameters():
        p.requires_grad_(False)
    distributed.setup()
    distributed.check_batch_size(settings.batch_size)
    objective = DistillationObjective(
        distill.weights,
        MemoryBank(distill.memory_size, distill.memory_samples),
        generator=torch.Generator().manual_seed(settings.seed),
        share=distributed.gather_items if distributed.active() else None,
    )
    names = [s.name for s in train]
    targets = load_teacher_targets(targets_file, names, objective.needs_features) if targets_file else None
    if targets is None:
        on_status(f"computing teacher outputs for {len(train)} training images (once)")
        targets = distributed.split_work(lambda part: compute_teacher_targets(teacher, part, objective.needs_features), train)
        if targets_file and distributed.is_main():
            save_teacher_targets(targets, names, targets_file)
    extra_modules = []
    if distill.weights.cwd > 0:
        with torch.no_grad():
            probe = torch.zeros(1, 1, settings.augment.crop, settings.augment.crop)
            _, _, student_feats = student.forward_padded(probe)
            _, _, teacher_feats = teacher.forward_padded(probe)
        objective.adapter = make_adapter(student_feats, teacher_feats)
        extra_modules.append(objective.adapter)

    def step_loss(net: EmbeddingUNet, batch: DistillBatch):
        emb, fg, feats = net.forward_padded(batch.images)
        affinities = embedding_affinities(emb)
        loss, parts = segmentation_loss(emb, fg, batch.labels, settings.foreground_weight, affinities)
        loss = distill.segmentation_weight * loss
        kd, kd_parts = objective(NetOut(emb, feats, affinities), batch.teacher, graph_labels(batch.labels), batch.image_ids)
        return loss + kd, {**parts, **{f"kd_{k}": v for k, v in kd_parts.items()}}

    return run_training(
        student, distill_batches(train, targets, settings), Path(run_dir), settings,
        step_loss=step_loss, metadata=metadata, extra_modules=extra_modules, validate=validate,
        on_progress=on_progress, should_stop=should_stop, stateful=[objective],
    )


def distill_student(
    teacher_checkpoint: str | Path,
    data_dir: str | Path,
    run_dir: str | Path,
    student_architecture: str,
    settings: TrainSettings,
    distill: DistillSettings,
    *,
    n_tune: int = 10,
    command: str = "",
    validate_factory: Callable[[list], Callable[[EmbeddingUNet], dict[str, float]]] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_status: Callable[[str], None] = lambda message: None,
    should_stop: Callable[[], bool] = lambda: False,
    targets_dir: Path | None = None,
) -> dict[str, Any]:
    """Distil ``student_architecture`` from a teacher checkpoint on ``data_dir`` (tune images held out).

    ``targets_dir`` keeps the teacher's outputs on disk between runs (one file per teacher, redone for other images).
    """
    teacher, teacher_meta = load_checkpoint(teacher_checkpoint)
    train, tune = load_train_tune(data_dir, n_tune)
    tune_names = [s.name for s in tune]
    torch.manual_seed(settings.seed)
    student = build_model(student_architecture)
    digest = hashlib.sha256(Path(teacher_checkpoint).read_bytes()).hexdigest()[:16]
    metadata = {
        "name": f"{student_architecture} distilled ({distill.method})",
        "teacher": {"path": str(teacher_checkpoint), "sha256_16": digest, "name": teacher_meta.get("name")},
        "distillation": distill.to_dict(),
        "training_data": {"folder": str(data_dir), "train_images": len(train), "tune_images": tune_names},
        "command": command,
        "train_diameter": teacher_meta.get("train_diameter", TRAIN_DIAMETER),
    }
    validate = validate_factory(tune) if (validate_factory is not None and tune) else None
    return distill_samples(teacher, student, train, run_dir, settings, distill, metadata=metadata, validate=validate,
                           on_progress=on_progress, on_status=on_status, should_stop=should_stop,
                           targets_file=None if targets_dir is None else Path(targets_dir) / f"teacher-{digest}.safetensors")
