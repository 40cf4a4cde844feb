"""Supervised training of a teacher (or of a student without distillation) on one or more annotated sources, or on volumes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..data import TRAIN_DIAMETER, Sample, Source, load_source, make_batch, parse_source
from ..io.checkpoint import load_checkpoint
from ..models import EmbeddingUNet, UNetConfig, build_model
from .loop import TrainSettings, run_training, segmentation_loss
from .volumes import Crop, make_volume_batch, volume_offsets

TuneSets = dict[str, list[Sample]]


def source_tune_folder(entry: dict[str, Any], data_root: str | Path | None) -> Path:
    """Folder holding a source's tune images: as recorded, or found under ``data_root`` (``NAME/tune``, ``NAME/train``, ``NAME``)."""
    recorded = Path(entry.get("tune_folder") or entry["folder"])
    if data_root is None:
        return recorded
    root, names = Path(data_root), set(entry["tune_images"])
    for candidate in (root / entry["name"] / "tune", root / entry["name"] / "train", root / entry["name"], recorded):
        images = candidate / "images"
        if images.is_dir() and names <= {p.stem for p in images.iterdir()}:
            return candidate
    raise ValueError(f"source {entry['name']}: no folder under {root} holds its {len(names)} tune images "
                     f"(expected {entry['name']}/tune as laid out by `graphkd data`)")


def tune_sets(metadata: dict[str, Any], data_root: str | Path | None = None) -> TuneSets:
    """The tune images of a checkpoint trained on sources, per source, rescaled as in training (e.g. to tune its decoder)."""
    entries = metadata.get("training_data", {}).get("sources") or []
    if not entries:
        raise ValueError("checkpoint metadata lists no training sources")
    sets = {}
    for entry in entries:
        tune_folder = source_tune_folder(entry, data_root)
        source = Source(entry["name"], Path(entry["folder"]), tuple(entry["tune_images"]), (), tune_folder=tune_folder)
        sets[source.name] = load_source(source)[1] if source.tune else []
    return sets


def sources_metadata(sources: Sequence[Source], train: list[list[Sample]]) -> dict[str, Any]:
    """Checkpoint record of the training sources (read back by :func:`tune_sets`)."""
    return {
        "folder": str(sources[0].folder) if len(sources) == 1 else None,
        "train_images": sum(len(t) for t in train),
        "tune_images": [name for s in sources for name in s.tune],
        "sources": [
            {"name": s.name, "folder": str(s.folder), "tune_folder": str(s.tune_folder or s.folder),
             "train_images": len(t), "tune_images": list(s.tune), "weight": s.weight}
            for s, t in zip(sources, train)
        ],
    }


def load_sources(sources: Sequence[Source], diameter: float = TRAIN_DIAMETER) -> tuple[list[list[Sample]], TuneSets]:
    """Train samples per source and tune samples by source name, rescaled to nuclei of ``diameter`` px; one clear error
    for a shared name or a source left without training images."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"two sources share a name: {', '.join(names)}")
    loaded = [load_source(s, diameter) for s in sources]
    empty = [s.name for s, (train, _) in zip(sources, loaded) if not train]
    if empty:
        raise ValueError(f"source {empty[0]}: no training images left")
    return [pair[0] for pair in loaded], {s.name: pair[1] for s, pair in zip(sources, loaded)}


def train_segmentation(
    data: str | Path | Sequence[Source],
    run_dir: str | Path,
    architecture: str,
    settings: TrainSettings,
    *,
    n_tune: int = 10,
    init_checkpoint: str | Path | None = None,
    command: str = "",
    validate_factory: Callable[[TuneSets], Callable[[EmbeddingUNet], dict[str, float]]] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Train on one folder (``n_tune`` images held out) or on several :class:`Source` s, validating on their tune images.

    Every image is rescaled so its nuclei have :data:`TRAIN_DIAMETER` px; each batch item picks a
    source by the sources' weights, then one of its images.
    """
    sources = [parse_source(str(data), n_tune)] if isinstance(data, (str, Path)) else list(data)
    train, tune = load_sources(sources)
    torch.manual_seed(settings.seed)
    model = load_checkpoint(init_checkpoint)[0] if init_checkpoint is not None else build_model(architecture)
    metadata = {
        "name": architecture,
        "training_data": sources_metadata(sources, train),
        "command": command,
        "train_diameter": TRAIN_DIAMETER,
        "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
    }
    validate = validate_factory(tune) if (validate_factory is not None and any(tune.values())) else None
    weights = [s.weight for s in sources]

    def step_loss(net: EmbeddingUNet, batch):
        images, labels = batch
        emb, fg = net(torch.from_numpy(images))
        return segmentation_loss(emb, fg, labels, settings.foreground_weight)

    return run_training(
        model,
        lambda rng: make_batch(train, settings.batch_size, settings.augment, rng, weights),
        Path(run_dir),
        settings,
        step_loss=step_loss,
        metadata=metadata,
        validate=validate,
        on_progress=on_progress,
        should_stop=should_stop,
    )


def volume_model(architecture: str | UNetConfig, init_checkpoint: str | Path | None = None) -> EmbeddingUNet:
    """A 3D network to train: from a checkpoint, else built from a (named) config; 2D ones are refused in one line."""
    model = load_checkpoint(init_checkpoint)[0] if init_checkpoint is not None else build_model(architecture)
    if model.config.ndim != 3:
        raise ValueError(f"{init_checkpoint or architecture} is a 2D network; volumes need a 3D one (e.g. unet3d-teacher)")
    return model


def train_volumes(
    train: Sequence[Sample],
    run_dir: str | Path,
    architecture: str | UNetConfig,
    settings: TrainSettings,
    *,
    crop: Crop = (16, 64, 64),
    voxel_size: tuple[float, float, float] | None = None,
    init_checkpoint: str | Path | None = None,
    command: str = "",
    metadata: dict[str, Any] | None = None,
    validate: Callable[[EmbeddingUNet], dict[str, float]] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Train a 3D network on normalised volume samples (Z,Y,X) with random ``crop`` (z, y, x) windows.

    ``voxel_size`` (z, y, x; None = isotropic) sets the z offsets (:func:`.volumes.volume_offsets`); the
    checkpoints record both. Augmentation: y-x quarter turns and mirror, intensity jitter (``settings.augment``); no rescaling.
    ``validate`` returns scores with a ``score`` key (best.safetensors follows it).
    """
    samples = list(train)
    if not samples or any(s.image.ndim != 3 or s.labels.shape != s.image.shape for s in samples):
        raise ValueError("volume training needs (Z,Y,X) images with labels of the same shape")
    torch.manual_seed(settings.seed)
    model = volume_model(architecture, init_checkpoint)
    offsets = volume_offsets(voxel_size)
    meta = {
        "name": architecture if isinstance(architecture, str) else "custom 3D network",
        "training_data": {"volumes": [s.name for s in samples], "crop": list(crop)},
        "offsets": [list(o) for o in offsets],
        "command": command,
        "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
        "voxel_size": [float(v) for v in (voxel_size or (1.0, 1.0, 1.0))],  # isotropic unless told otherwise
        **(metadata or {}),
    }

    def step_loss(net: EmbeddingUNet, batch):
        images, labels = batch
        emb, fg = net(torch.from_numpy(images))
        return segmentation_loss(emb, fg, labels, settings.foreground_weight, offsets=offsets)

    return run_training(
        model,
        lambda rng: make_volume_batch(samples, settings.batch_size, settings.augment, tuple(crop), rng),
        Path(run_dir),
        settings,
        step_loss=step_loss,
        metadata=meta,
        validate=validate,
        on_progress=on_progress,
        should_stop=should_stop,
    )
