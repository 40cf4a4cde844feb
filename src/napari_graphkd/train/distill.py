"""Distilling a student from a frozen teacher whose outputs are computed once and cached.

The teacher's embedding (and, for feature baselines, its decoder features) is computed once per
training image (docs/method.md, "Benchmark protocol"). Each step crops the same window from image, labels and cached
teacher maps, applies the same flips/rotations to all of them, and jitters the intensities of
the student's input only. Crop origins are multiples of 16 so cached coarse features stay
aligned. Volumes (Z,Y,X) work the same with a (z, y, x) crop, turned in y-x only and aligned to
the cached features' scales per axis. There is no scale augmentation here (it would need the teacher re-run); every student
row of the benchmark (no-KD included) uses this same pipeline.

Label maps follow the partial-annotation convention (< 0 = not annotated, ignored by the
segmentation loss). An unannotated pixel may also carry a pseudo-instance (e.g. one of the
teacher's decoded nuclei) for the graph terms: pseudo-instance k is stored as -1-k
(:func:`with_pseudo_labels`, read back by :func:`graph_labels`); images given without labels carry
the teacher's decoded instances this way (:mod:`.pseudo`), or, for the pseudo-label baseline
(method ``pseudo``), carry them as ordinary labels.

Several sources (labelled and unlabelled) are sampled as in ``graphkd train``
(:func:`napari_graphkd.data.pick_samples`: each batch item picks a source by weight, then an image).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import safe_open

from ..data import Sample, Source, jitter_intensity, load_train_tune, parse_source, pick_samples
from ..affinity import Offsets, embedding_affinities, offsets_from_metadata
from ..distill import DistillationObjective, DistillWeights, MemoryBank, NetOut, make_adapter, method_weights
from ..inference import TRAIN_DIAMETER
from ..io.checkpoint import atomic_save_tensors, load_checkpoint
from ..models import EmbeddingUNet, build_model
from ..segment import ModelSegmenter
from . import distributed
from .loop import TrainSettings, run_training, segmentation_loss
from .pseudo import UnlabelledSource, decode_unlabelled
from .volumes import Crop

ALIGN = 16
PSEUDO = "pseudo"  # the method whose unlabelled images train with the teacher's instances as labels, no KD terms


@dataclass
class TeacherTargets:
    """Cached teacher outputs for one training image (float16)."""

    embedding: torch.Tensor  # (C,*spatial)
    features: list[torch.Tensor]  # decoder stages at the padded image's scales, coarse to fine


@dataclass
class DistillBatch:
    """One distillation step's inputs and targets."""

    images: torch.Tensor  # (B,1,*crop) student input
    labels: np.ndarray  # (B,*crop) instance labels, < 0 = not annotated
    teacher: NetOut  # cached teacher embedding (B,C,*crop) and features
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


def crop_shape(settings: TrainSettings, ndim: int, crop: Crop | None = None) -> tuple[int, ...]:
    """The crop of each batch item: square ``settings.augment.crop`` for images, ``crop`` (z, y, x) for volumes."""
    if ndim == 3 and crop is None:
        raise ValueError("distilling on volumes needs a (z, y, x) crop size")
    return tuple(crop) if ndim == 3 else (settings.augment.crop,) * 2


def fit_crop(sample: Sample, size: int | tuple[int, ...]) -> Sample:
    """``sample`` padded to at least ``size`` px per axis (image reflected, labels -1 = not annotated)."""
    sizes = (size,) * sample.labels.ndim if isinstance(size, int) else tuple(size)
    pad = tuple((0, max(0, s - n)) for s, n in zip(sizes, sample.labels.shape))
    if not any(p for _, p in pad):
        return sample
    return Sample(sample.name, np.pad(sample.image, pad, mode="reflect"), np.pad(sample.labels, pad, constant_values=-1),
                  sample.scale)


def _crop_and_turn(t: torch.Tensor, origin: tuple[int, ...], size: tuple[int, ...], scale: tuple[int, ...], k: int,
                   flip: bool) -> torch.Tensor:
    """Crop a (…,*spatial) map at a 1/scale resolution per axis, then rotate by k*90° in y-x and optionally flip x."""
    window = tuple(slice(o // f, o // f + n // f) for o, n, f in zip(origin, size, scale))
    out = torch.rot90(t[(..., *window)], k, dims=(-2, -1))
    return torch.flip(out, dims=(-1,)) if flip else out


def _feature_scales(t: TeacherTargets, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per cached feature level, its downsampling factor per axis (the finest level is at the padded input size)."""
    padded = t.features[-1].shape[1:] if t.features else shape
    return [tuple(p // n for p, n in zip(padded, f.shape[1:])) for f in t.features]


def distill_batches(samples: list[Sample] | list[list[Sample]], targets: list[TeacherTargets], settings: TrainSettings,
                    weights: list[float] | None = None, crop: Crop | None = None):
    """Batch factory of aligned (image, labels, teacher maps) crops with shared geometric augmentation.

    ``samples`` is one list, or one list per source (``targets`` in the same order, flattened), drawn as
    :func:`napari_graphkd.data.pick_samples` draws them (by ``weights``, default equal). Images use square
    ``settings.augment.crop`` crops at multiples of ALIGN; volumes need ``crop`` (z, y, x), at multiples of the
    coarsest cached feature scale per axis (1 without features).
    """
    sources = samples if samples and isinstance(samples[0], list) else [samples]
    volumes = sources[0][0].image.ndim == 3
    size = crop_shape(settings, 3 if volumes else 2, crop)
    align = tuple(max([1, *(f[a] for f in _feature_scales(targets[0], size))]) for a in range(3)) if volumes else (ALIGN, ALIGN)
    if any(n % a for n, a in zip(size, align)):
        raise ValueError(f"distillation crop size {size} must be a multiple of {align}")
    pairs, flat = [], iter(targets)
    for source in sources:
        pairs.append([(s, next(flat)) for s in source])

    def make(rng: np.random.Generator) -> DistillBatch:
        images, labels, embs, feats, ids = [], [], [], [], []
        for s, t in pick_samples(pairs, weights, settings.batch_size, rng):
            if any(n < c for n, c in zip(s.image.shape, size)):
                raise ValueError(f"image {s.name} ({'x'.join(map(str, s.image.shape))}) is smaller than the crop size "
                                 f"{'x'.join(map(str, size))}")
            origin = tuple(int(rng.integers(0, (n - c) // a + 1)) * a for n, c, a in zip(s.image.shape, size, align))
            k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
            if size[-2] != size[-1]:
                k = 2 * (k % 2)  # only half turns keep a non-square y-x crop's shape
            ones = (1,) * len(size)
            img = _crop_and_turn(torch.from_numpy(s.image), origin, size, ones, k, flip).numpy()
            images.append(jitter_intensity(img, settings.augment, rng))
            labels.append(_crop_and_turn(torch.from_numpy(s.labels), origin, size, ones, k, flip).numpy())
            embs.append(_crop_and_turn(t.embedding, origin, size, ones, k, flip))
            feats.append([_crop_and_turn(f, origin, size, scale, k, flip) for f, scale in zip(t.features, _feature_scales(t, size))])
            ids.append(s.name)
        teacher = NetOut(torch.stack(embs).float(), [torch.stack(level).float() for level in zip(*feats)])
        x_in = torch.from_numpy(np.ascontiguousarray(np.stack(images)[:, None]))
        return DistillBatch(x_in, np.stack(labels), teacher, ids)

    return make


def distill_samples(
    teacher: EmbeddingUNet,
    student: EmbeddingUNet,
    train: list[Sample] | list[list[Sample]],
    run_dir: str | Path,
    settings: TrainSettings,
    distill: DistillSettings,
    *,
    metadata: dict[str, Any],
    weights: list[float] | None = None,
    validate: Callable[[EmbeddingUNet], dict[str, float]] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_status: Callable[[str], None] = lambda message: None,
    should_stop: Callable[[], bool] = lambda: False,
    targets_file: Path | None = None,
    offsets: Offsets | None = None,
    crop: Crop | None = None,
) -> dict[str, Any]:
    """Distil ``student`` from a frozen ``teacher`` on in-memory samples (labels: see :func:`graph_labels`).

    ``train`` is one list of samples or one list per source, sampled by ``weights`` (default equal).
    ``targets_file`` caches the teacher's outputs on disk so that runs on the same teacher and images
    (a benchmark's rows) compute them once; the caller keeps one file per teacher and data folder.
    Volumes (Z,Y,X) need 3D networks and a (z, y, x) ``crop``; ``offsets`` (the teacher's, see
    ``affinity.offsets_from_metadata``) drive the segmentation loss and AGD and are recorded in the checkpoints.
    """
    sources = [list(source) for source in (train if train and isinstance(train[0], list) else [train])]
    ndim = sources[0][0].image.ndim
    if teacher.config.ndim != ndim or student.config.ndim != ndim:
        raise ValueError(f"teacher ({teacher.config.ndim}D) and student ({student.config.ndim}D) must both be {ndim}D "
                         f"for {'volumes' if ndim == 3 else 'images'}")
    size = crop_shape(settings, ndim, crop)
    if offsets is not None:
        metadata = dict(metadata, offsets=[list(o) for o in offsets])
    for p in teacher.parameters():
        p.requires_grad_(False)
    distributed.setup()
    distributed.check_batch_size(settings.batch_size)
    objective = DistillationObjective(
        distill.weights,
        MemoryBank(distill.memory_size, distill.memory_samples),
        generator=torch.Generator().manual_seed(settings.seed),
        share=distributed.gather_items if distributed.active() else None,
        offsets=offsets,
    )
    sources = [[fit_crop(s, size) for s in source] for source in sources]
    flat = [s for source in sources for s in source]
    names = [s.name if s.scale == 1.0 else f"{s.name}@{s.scale:.6g}" for s in flat]  # a rescaled image has other outputs
    targets = load_teacher_targets(targets_file, names, objective.needs_features) if targets_file else None
    if targets is None:
        on_status(f"computing teacher outputs for {len(flat)} training images (once)")
        targets = distributed.split_work(lambda part: compute_teacher_targets(teacher, part, objective.needs_features), flat)
        if targets_file and distributed.is_main():
            save_teacher_targets(targets, names, targets_file)
    extra_modules = []
    if distill.weights.cwd > 0:
        with torch.no_grad():
            probe = torch.zeros(1, 1, *size)
            _, _, student_feats = student.forward_padded(probe)
            _, _, teacher_feats = teacher.forward_padded(probe)
        objective.adapter = make_adapter(student_feats, teacher_feats)
        extra_modules.append(objective.adapter)

    def step_loss(net: EmbeddingUNet, batch: DistillBatch):
        emb, fg, feats = net.forward_padded(batch.images)
        affinities = embedding_affinities(emb, offsets)
        loss, parts = segmentation_loss(emb, fg, batch.labels, settings.foreground_weight, affinities, offsets)
        loss = distill.segmentation_weight * loss
        kd, kd_parts = objective(NetOut(emb, feats, affinities), batch.teacher, graph_labels(batch.labels), batch.image_ids)
        return loss + kd, {**parts, **{f"kd_{k}": v for k, v in kd_parts.items()}}

    return run_training(
        student, distill_batches(sources, targets, settings, weights, crop), Path(run_dir), settings,
        step_loss=step_loss, metadata=metadata, extra_modules=extra_modules, validate=validate,
        on_progress=on_progress, should_stop=should_stop, stateful=[objective],
    )


def unlabelled_samples(decoded: list[list[Sample]], method: str) -> list[list[Sample]]:
    """Decoded unlabelled samples as training samples: the teacher's instances as labels (method ``pseudo``), else as
    pseudo-instances for the graph terms on pixels the segmentation loss ignores."""
    if method == PSEUDO:
        return decoded
    return [[Sample(s.name, s.image, with_pseudo_labels(np.full_like(s.labels, -1), s.labels), s.scale) for s in source]
            for source in decoded]


def teacher_digest(teacher_checkpoint: str | Path) -> str:
    """First 16 hex digits of the teacher file's SHA-256: names its cached outputs and is recorded in the student."""
    return hashlib.sha256(Path(teacher_checkpoint).read_bytes()).hexdigest()[:16]


def student_provenance(teacher_checkpoint: str | Path, teacher_meta: dict[str, Any], student_architecture: str,
                       distill: DistillSettings, init_checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Metadata every distilled student records: its name, its teacher (path, digest, name), the settings and the
    trained student it continues (``init_checkpoint``, None for a new network)."""
    start = student_architecture if init_checkpoint is None else f"{Path(init_checkpoint).stem}, continued,"
    return {
        "name": f"{start} distilled ({distill.method})",
        "teacher": {"path": str(teacher_checkpoint), "sha256_16": teacher_digest(teacher_checkpoint),
                    "name": teacher_meta.get("name")},
        "distillation": distill.to_dict(),
        "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
    }


def student_model(student_architecture: str, teacher: EmbeddingUNet, teacher_meta: dict[str, Any],
                  init_checkpoint: str | Path | None = None) -> EmbeddingUNet:
    """A new ``student_architecture`` network, or the student of ``init_checkpoint`` to distil further (e.g. with a new
    teacher or new images); ValueError when that student cannot learn from this teacher (dimensions, offsets)."""
    if init_checkpoint is None:
        return build_model(student_architecture)
    student, meta = load_checkpoint(init_checkpoint)
    if student.config.ndim != teacher.config.ndim:
        raise ValueError(f"{init_checkpoint} is a {student.config.ndim}D network and the teacher is {teacher.config.ndim}D")
    if offsets_from_metadata(meta) != offsets_from_metadata(teacher_meta):
        raise ValueError(f"{init_checkpoint} predicts affinities at other offsets than the teacher")
    return student


def distill_volume_student(
    teacher_checkpoint: str | Path,
    train: list[Sample],
    run_dir: str | Path,
    student_architecture: str,
    settings: TrainSettings,
    distill: DistillSettings,
    *,
    crop: Crop = (16, 64, 64),
    command: str = "",
    validate: Callable[[EmbeddingUNet], dict[str, float]] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_status: Callable[[str], None] = lambda message: None,
    should_stop: Callable[[], bool] = lambda: False,
    targets_dir: Path | None = None,
    init_checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Distil a 3D ``student_architecture`` from a 3D teacher checkpoint on volume samples (Z,Y,X).

    The student uses the teacher's offsets and records its voxel size; ``targets_dir`` and ``init_checkpoint`` as in
    :func:`distill_student`.
    """
    teacher, teacher_meta = load_checkpoint(teacher_checkpoint)
    torch.manual_seed(settings.seed)
    student = student_model(student_architecture, teacher, teacher_meta, init_checkpoint)
    metadata = {
        **student_provenance(teacher_checkpoint, teacher_meta, student_architecture, distill, init_checkpoint),
        "training_data": {"volumes": [s.name for s in train], "crop": list(crop)},
        "command": command,
        **({"voxel_size": teacher_meta["voxel_size"]} if "voxel_size" in teacher_meta else {}),
    }
    targets_file = None if targets_dir is None else Path(targets_dir) / f"teacher-{teacher_digest(teacher_checkpoint)}.safetensors"
    return distill_samples(teacher, student, train, run_dir, settings, distill, metadata=metadata, validate=validate,
                           on_progress=on_progress, on_status=on_status, should_stop=should_stop, targets_file=targets_file,
                           offsets=offsets_from_metadata(teacher_meta), crop=crop)


def distill_student(
    teacher_checkpoint: str | Path,
    data: str | Path | Sequence[Source],
    run_dir: str | Path,
    student_architecture: str,
    settings: TrainSettings,
    distill: DistillSettings,
    *,
    unlabelled: Sequence[UnlabelledSource] = (),
    n_tune: int = 10,
    command: str = "",
    validate_factory: Callable[[Any], Callable[[EmbeddingUNet], dict[str, float]]] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_status: Callable[[str], None] = lambda message: None,
    should_stop: Callable[[], bool] = lambda: False,
    targets_dir: Path | None = None,
    init_checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Distil ``student_architecture`` from a teacher checkpoint on labelled data and optional unlabelled images.

    ``data`` is one folder, used as it is (``n_tune`` images held out; ``validate_factory`` gets the
    tune samples as a list), or several :class:`~napari_graphkd.data.Source` s loaded as ``graphkd
    train`` loads them, rescaled to the teacher's training diameter (``validate_factory`` gets the
    tune samples per source). ``unlabelled`` images carry the teacher's decoded instances
    (:func:`unlabelled_samples`). Every labelled source and unlabelled source is one source of the
    balanced sampling. ``targets_dir`` keeps the teacher's outputs and decoded instances on disk
    between runs (one file each per teacher, redone for other images). ``init_checkpoint`` starts from a trained
    student instead of a new ``student_architecture`` network (its architecture is used).
    """
    teacher, teacher_meta = load_checkpoint(teacher_checkpoint)
    train_diameter = teacher_meta.get("train_diameter", TRAIN_DIAMETER)
    if isinstance(data, (str, Path)):
        train, tune = load_train_tune(data, n_tune)
        sources, labelled = [parse_source(str(data), n_tune)], [train]
        training_data = {"folder": str(data), "train_images": len(train), "tune_images": [s.name for s in tune]}
    else:
        from .segmentation import load_sources, sources_metadata

        sources = list(data)
        labelled, tune = load_sources(sources, train_diameter)
        training_data = sources_metadata(sources, labelled)
    if distill.method == PSEUDO and not unlabelled:
        raise ValueError(f"method {PSEUDO} trains on the teacher's labels of unlabelled images: give some")
    digest = teacher_digest(teacher_checkpoint)
    decoded = []
    if unlabelled:
        on_status(f"the teacher's instances on {len(unlabelled)} unlabelled source(s) (decoded once, cached with targets_dir)")
        decoded = decode_unlabelled(ModelSegmenter(teacher_checkpoint), list(unlabelled),
                                    None if targets_dir is None else Path(targets_dir) / f"pseudo-{digest}.safetensors")
        training_data["unlabelled"] = [
            {"name": u.name, "folder": str(u.folder), "images": len(d), "weight": u.weight,
             "used_as": "labels" if distill.method == PSEUDO else "graph nodes"} for u, d in zip(unlabelled, decoded)]
    torch.manual_seed(settings.seed)
    student = student_model(student_architecture, teacher, teacher_meta, init_checkpoint)
    metadata = {
        **student_provenance(teacher_checkpoint, teacher_meta, student_architecture, distill, init_checkpoint),
        "training_data": training_data,
        "command": command,
        "train_diameter": train_diameter,
    }
    has_tune = any(tune.values()) if isinstance(tune, dict) else bool(tune)
    validate = validate_factory(tune) if (validate_factory is not None and has_tune) else None
    weights = [s.weight for s in sources] + [u.weight for u in unlabelled]
    return distill_samples(teacher, student, labelled + unlabelled_samples(decoded, distill.method), run_dir, settings,
                           distill, metadata=metadata, weights=weights, validate=validate,
                           on_progress=on_progress, on_status=on_status, should_stop=should_stop,
                           targets_file=None if targets_dir is None else Path(targets_dir) / f"teacher-{digest}.safetensors")
