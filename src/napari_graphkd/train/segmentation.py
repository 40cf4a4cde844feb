"""Supervised training of a teacher (or of a student without distillation) on an annotated folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..data import load_train_tune, median_diameter
from ..io.checkpoint import load_checkpoint
from ..models import EmbeddingUNet, build_model
from .loop import TrainSettings, run_training, segmentation_batches, segmentation_loss


def train_segmentation(
    data_dir: str | Path,
    run_dir: str | Path,
    architecture: str,
    settings: TrainSettings,
    *,
    n_tune: int = 10,
    init_checkpoint: str | Path | None = None,
    command: str = "",
    validate_factory: Callable[[list], Callable[[EmbeddingUNet], dict[str, float]]] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Train on ``data_dir`` minus its tune images (a sibling ``tune/`` folder, else ``n_tune`` held out; validated on those)."""
    train, tune = load_train_tune(data_dir, n_tune)
    tune_names = [s.name for s in tune]
    torch.manual_seed(settings.seed)
    if init_checkpoint is not None:
        model, _ = load_checkpoint(init_checkpoint)
    else:
        model = build_model(architecture)
    metadata = {
        "name": architecture,
        "training_data": {"folder": str(data_dir), "train_images": len(train), "tune_images": tune_names},
        "command": command,
        "train_diameter": median_diameter(train),
        "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
    }
    validate = validate_factory(tune) if (validate_factory is not None and tune) else None

    def step_loss(net: EmbeddingUNet, batch):
        images, labels = batch
        emb, fg = net(torch.from_numpy(images))
        return segmentation_loss(emb, fg, labels, settings.foreground_weight)

    return run_training(
        model,
        segmentation_batches(train, settings),
        Path(run_dir),
        settings,
        step_loss=step_loss,
        metadata=metadata,
        validate=validate,
        on_progress=on_progress,
        should_stop=should_stop,
    )
