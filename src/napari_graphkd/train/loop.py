"""Resumable training loop shared by segmentation training and distillation."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..affinity import Offsets, affinity_loss, embedding_affinities, label_affinities
from ..data import AugmentConfig, Sample, make_batch
from ..io.checkpoint import CheckpointError, atomic_write_text, read_metadata, save_checkpoint
from ..models import EmbeddingUNet
from . import distributed
from .state import ResumeError, Stateful, load_state, remove_stale_temps, save_state


@dataclass
class TrainSettings:
    """Optimisation schedule and bookkeeping of one run."""

    steps: int = 12000
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 300
    foreground_weight: float = 1.0
    seed: int = 0
    save_every: int = 250
    snapshot_every: int = 1000
    validate_every: int = 1000
    bf16: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly settings for checkpoint metadata."""
        return asdict(self)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (MB), reported per training method."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warm-up then cosine decay to 2 % of the peak."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def training_autocast(model: EmbeddingUNet, settings: TrainSettings) -> torch.autocast:
    """The autocast of a training step: bf16 for 2D networks when ``settings.bf16``, float32 for 3D ones.

    On CPU, bf16 weight gradients of 3D convolutions on small volumes (the deepest levels of a crop,
    e.g. 1x4x4 voxels) come back at random as garbage up to 1e36 (torch 2.13, oneDNN): the source of
    the non-finite losses of 3D training. In float32 they are exact and repeatable.
    """
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=uses_bf16(model, settings))


def uses_bf16(model: EmbeddingUNet, settings: TrainSettings) -> bool:
    """Whether training steps run under bf16 autocast (2D networks with ``settings.bf16``); recorded in checkpoints."""
    return settings.bf16 and model.config.ndim == 2


def batch_targets(labels: np.ndarray, offsets: Offsets | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affinity targets, validity mask, foreground target and its mask for a (B,H,W) or (B,D,H,W) label batch.

    Labels < 0 mark unannotated pixels (partial annotation): every pair and pixel touching them
    is left out of the loss instead of being taught as background. ``offsets`` None = the defaults
    of the labels' dimensionality.
    """
    pairs = [label_affinities(lab, offsets) for lab in labels]
    target = torch.from_numpy(np.stack([p[0] for p in pairs]))
    valid = torch.from_numpy(np.stack([p[1] for p in pairs]))
    foreground = torch.from_numpy((labels > 0).astype(np.float32))[:, None]
    known = torch.from_numpy((labels >= 0).astype(np.float32))[:, None]
    return target, valid, foreground, known


def segmentation_loss(
    embedding: torch.Tensor, fg_logit: torch.Tensor | None, labels: np.ndarray, foreground_weight: float,
    affinities: torch.Tensor | None = None, offsets: Offsets | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Affinity loss (docs/method.md, "Segmentation loss") plus BCE of the foreground head, on annotated pixels only.

    Images or volumes alike. ``affinities`` of ``embedding`` may be passed when already computed
    (distillation reuses them); ``offsets`` None = the defaults of the embedding's dimensionality.
    """
    target, valid, foreground, known = batch_targets(labels, offsets)
    affinities = embedding_affinities(embedding, offsets) if affinities is None else affinities
    loss_aff = affinity_loss(affinities, target, valid)
    parts = {"affinity": float(loss_aff.detach())}
    loss = loss_aff
    if fg_logit is not None and foreground_weight > 0:
        bce = F.binary_cross_entropy_with_logits(fg_logit.float(), foreground, reduction="none")
        loss_fg = (bce * known).sum() / known.sum().clamp_min(1.0)
        loss = loss + foreground_weight * loss_fg
        parts["foreground"] = float(loss_fg.detach())
    return loss, parts


StepLoss = Callable[[EmbeddingUNet, Any], tuple[torch.Tensor, dict[str, float]]]
BatchFactory = Callable[[np.random.Generator], Any]


def segmentation_batches(samples: list[Sample], settings: TrainSettings) -> BatchFactory:
    """Batch factory of augmented (images (B,1,S,S), labels (B,S,S)) crops."""
    return lambda rng: make_batch(samples, settings.batch_size, settings.augment, rng)


def run_training(
    model: EmbeddingUNet,
    batches: BatchFactory,
    run_dir: Path,
    settings: TrainSettings,
    *,
    step_loss: StepLoss,
    metadata: dict[str, Any],
    extra_modules: list[torch.nn.Module] = (),
    validate: Callable[[EmbeddingUNet], dict[str, float]] | None = None,
    select_metric: str = "score",
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    stateful: Sequence[Stateful] = (),
) -> dict[str, Any]:
    """Train ``model`` on batches from ``batches(rng)`` with resumable state in ``run_dir``; return the progress.

    ``run_dir`` holds ``state.safetensors`` (the resume point: model, optimiser, progress in one
    file, see :mod:`.state`), its copies ``last.safetensors`` and ``progress.json``,
    ``best.safetensors`` (best on the validation callback's ``select_metric``) and periodic
    ``step_NNNNNN.safetensors`` snapshots. Re-running with the same ``run_dir`` resumes exactly
    (batches and dropout are seeded by step) or raises ResumeError.
    ``extra_modules`` (e.g. distillation adapters) are optimised too but not saved in the model file;
    ``stateful`` objects (e.g. the distillation objective's memory bank) are saved in the state too.
    Under ``torchrun`` each rank trains on its share of every batch, and rank 0 alone validates and
    writes ``run_dir`` (see :mod:`.distributed`).
    """
    distributed.setup()
    distributed.check_batch_size(settings.batch_size)
    main = distributed.is_main()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        remove_stale_temps(run_dir)
    params = [p for m in (model, *extra_modules) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    progress = load_state(run_dir, model, optimizer, list(extra_modules), stateful)
    resumed = progress is not None
    if not distributed.same_on_all_ranks(progress and progress["step"]):
        raise ResumeError(f"the processes see different run states in {run_dir}; it must be on a filesystem all of them share")
    if not resumed:
        progress = {"step": 0, "history": [], "validation": [], "best": None, "seconds": 0.0}
    model.train()
    meta = dict(metadata, training=dict(settings.to_dict(), bf16=uses_bf16(model, settings)))  # what ran, not what was asked
    saved_step = progress["step"] if resumed else None

    def checkpoint(name: str, overwrite: bool = True) -> None:
        if not main:
            return
        model.eval()
        save_checkpoint(run_dir / name, model, dict(meta, step=progress["step"], validation=progress["validation"][-1:]), overwrite=overwrite)
        model.train()

    def export() -> None:
        """last.safetensors and progress.json: readable copies of the state just saved."""
        checkpoint("last.safetensors")
        atomic_write_text(run_dir / "progress.json", json.dumps(progress, indent=1))

    def save_all() -> None:
        nonlocal saved_step
        if saved_step == progress["step"]:
            return
        progress["peak_rss_mb"] = peak_memory_mb()
        saved_step = progress["step"]
        if main:
            save_state(run_dir, model, optimizer, list(extra_modules), progress, stateful)  # the resume point, one rename
            export()

    if resumed and main:
        export()  # a kill may have come between the state and its copies
        repair_best(run_dir, progress, checkpoint)
    run_step = distributed.parallel_step(model, extra_modules, step_loss)

    t_last = time.perf_counter()
    while progress["step"] < settings.steps:
        if distributed.any_rank(should_stop()):
            break
        step = progress["step"]
        rng = np.random.default_rng([settings.seed, step])
        torch.manual_seed(settings.seed * 1_000_003 + step)
        batch = distributed.shard(batches(rng))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        with training_autocast(model, settings):
            loss, parts = run_step(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 5.0)
        finite = not distributed.any_rank(not (torch.isfinite(loss.detach()) and torch.isfinite(grad_norm)))
        if finite:
            optimizer.step()
        else:  # the model and optimiser keep their last good state; the step counts as done
            progress["skipped"] = progress.get("skipped", 0) + 1
            if main:
                print(f"step {step + 1}: non-finite loss or gradient ({float(loss.detach()):g}, gradient norm "
                      f"{float(grad_norm):g}); step skipped ({progress['skipped']} so far)", file=sys.stderr, flush=True)
        now = time.perf_counter()
        progress["seconds"] += now - t_last
        t_last = now
        progress["step"] = step + 1
        record = {"step": step + 1, **distributed.mean_over_ranks({"loss": float(loss.detach()), **parts})}
        progress["history"].append(record)
        if on_progress is not None and main:
            on_progress(dict(record, total=settings.steps, seconds=progress["seconds"]))
        done = progress["step"]
        new_best = False
        if validate is not None and (done % settings.validate_every == 0 or done == settings.steps):
            model.eval()
            scores = distributed.from_main(validate(model) if main else None)  # the other ranks wait for rank 0
            model.train()
            progress["validation"].append({"step": done, **scores})
            best = progress["best"]
            if best is None or scores[select_metric] > best[select_metric]:
                progress["best"] = {"step": done, **scores}
                new_best = True
        # write order: a snapshot before the state (a kill in between redoes the steps and the snapshot);
        # a new best in the state before best.safetensors (see repair_best)
        if done % settings.snapshot_every == 0:
            checkpoint(f"step_{done:06d}.safetensors")
        if new_best or done % settings.save_every == 0 or done == settings.steps:
            save_all()
        if new_best:
            checkpoint("best.safetensors")
    save_all()
    distributed.barrier()  # every rank returns once rank 0's files are written
    model.eval()
    return progress


def repair_best(run_dir: Path, progress: dict[str, Any], checkpoint: Callable[[str], None]) -> None:
    """Make best.safetensors the model of the progress' best step after a kill between the two writes.

    A new best is first recorded in the state (saved at that very step), then written to
    best.safetensors; so a best file that disagrees means the kill came in between, and the model
    just resumed is the best one.
    """
    best = progress.get("best")
    path = run_dir / "best.safetensors"
    if best is None:
        return
    try:
        on_disk = read_metadata(path).get("step") if path.exists() else None
    except CheckpointError:
        on_disk = None
    if on_disk == best["step"]:
        return
    if progress["step"] != best["step"]:
        raise ResumeError(f"{path} (step {on_disk}) disagrees with the run's best step {best['step']} and cannot be rebuilt")
    checkpoint("best.safetensors")
