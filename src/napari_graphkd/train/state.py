"""Resumable run state: model, optimiser moments, extra modules and progress as one file, written atomically.

``state.safetensors`` in a run folder is the only resume point. It holds every tensor a step
changes (model weights and BatchNorm statistics, optimiser moments, extra modules such as
distillation adapters, :class:`Stateful` objects such as the distillation memory bank and its
sampler) and, in its header, the progress (step, history, validation, best) and the
optimiser's parameter groups. It is replaced in one rename, so a kill at any moment leaves either
the previous complete state or the new one. ``last.safetensors`` and ``progress.json`` are copies
for people and tools, re-derived from the state when a run resumes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..io.checkpoint import CheckpointError, atomic_save_tensors, is_stale_temp, load_checkpoint, read_metadata

STATE_FILE = "state.safetensors"
STATE_FORMAT = "graphkd-run-state-1"


class Stateful(Protocol):
    """Training state outside modules and optimiser (e.g. a distillation memory bank and its sampler)."""

    def get_state(self) -> tuple[dict[str, torch.Tensor], dict]: ...

    def set_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...


class ResumeError(ValueError):
    """A run folder cannot be resumed exactly (inconsistent or foreign files); nothing is trained."""


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimiser state dict into named tensors + JSON-able param groups (no pickle)."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete temp files of writes a kill interrupted (``.<name>.<random>.tmp``); return what was removed."""
    stale = [p for p in Path(run_dir).iterdir() if is_stale_temp(p) or p.name.startswith(".progress.json.")]
    for path in stale:
        path.unlink()
    return stale


def save_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               extra_modules: list[torch.nn.Module], progress: dict[str, Any], stateful: Sequence[Stateful] = ()) -> None:
    """Write the whole resume point of a run as one file, replacing the previous one in one rename."""
    opt, groups = optimizer_tensors(optimizer)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"optimizer.{k}": v for k, v in opt.items()})
    for i, extra in enumerate(extra_modules):
        tensors.update({f"extra{i}.{k}": v for k, v in extra.state_dict().items()})
    other = []
    for i, obj in enumerate(stateful):
        state, obj_meta = obj.get_state()
        tensors.update({f"state{i}.{k}": v for k, v in state.items()})
        other.append(obj_meta)
    meta = {"format": STATE_FORMAT, "progress": json.dumps(progress), "optimizer_groups": json.dumps(groups),
            "state": json.dumps(other)}
    atomic_save_tensors(tensors, Path(run_dir) / STATE_FILE, meta, overwrite=True)


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str, run_dir: Path) -> None:
    """Load a state dict, refusing a different architecture with one line."""
    expected = module.state_dict()
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise ResumeError(f"{run_dir} holds a run of a different {what}; use a new --out folder to start afresh")
    module.load_state_dict(tensors)


def load_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               extra_modules: list[torch.nn.Module], stateful: Sequence[Stateful] = ()) -> dict[str, Any] | None:
    """Restore everything of the saved step and return its progress; None for a folder without a run."""
    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    if not path.exists():
        return load_legacy_state(run_dir, model, optimizer, extra_modules, stateful)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        progress, groups = json.loads(meta["progress"]), json.loads(meta["optimizer_groups"])
        other = json.loads(meta.get("state", "[]"))
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ResumeError(f"{path} is not a readable run state ({exc}); use a new --out folder to start afresh") from None
    _load_module(model, _split(tensors, "model."), "network", run_dir)
    for i, extra in enumerate(extra_modules):
        _load_module(extra, _split(tensors, f"extra{i}."), "extra module", run_dir)
    try:
        restore_optimizer(optimizer, _split(tensors, "optimizer."), groups)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ResumeError(f"{run_dir}: the saved optimiser does not fit this run ({exc})") from None
    if len(other) != len(stateful):
        raise ResumeError(f"{run_dir} holds a run of another kind (saved state of {len(other)} training objects, "
                          f"this run has {len(stateful)}); use a new --out folder to start afresh")
    for i, (obj, obj_meta) in enumerate(zip(stateful, other)):
        try:
            obj.set_state(_split(tensors, f"state{i}."), obj_meta)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise ResumeError(f"{run_dir}: the saved training state does not fit this run ({exc})") from None
    return progress


def load_legacy_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      extra_modules: list[torch.nn.Module], stateful: Sequence[Stateful] = ()) -> dict[str, Any] | None:
    """Resume a run folder of the older layout (separate last/optimizer/progress files) when they agree.

    Those files were written model first and progress last, so a folder whose ``last.safetensors``
    and ``progress.json`` name the same step holds one consistent state; any other folder is refused.
    That layout kept no distillation memory bank: such a run resumes with an empty one.
    """
    last, progress_path, opt_path = run_dir / "last.safetensors", run_dir / "progress.json", run_dir / "optimizer.safetensors"
    if not last.exists():
        return None
    try:
        progress = json.loads(progress_path.read_text())
        step = read_metadata(last).get("step")
    except (OSError, ValueError, CheckpointError) as exc:
        raise ResumeError(f"{run_dir}: cannot resume, its run files are incomplete ({exc}); "
                          "use a new --out folder to start afresh") from None
    if step != progress.get("step"):
        raise ResumeError(f"{run_dir}: cannot resume exactly, last.safetensors is at step {step} but progress.json at "
                          f"step {progress.get('step')} (interrupted while saving); use a new --out folder")
    try:
        with safe_open(str(opt_path), framework="pt") as f:
            groups = json.loads((f.metadata() or {})["groups"])
        opt = load_file(str(opt_path))
        saved, _ = load_checkpoint(last)
    except (OSError, ValueError, KeyError, SafetensorError, CheckpointError) as exc:
        raise ResumeError(f"{run_dir}: cannot resume, its run files are incomplete ({exc}); "
                          "use a new --out folder to start afresh") from None
    _load_module(model, saved.state_dict(), "network", run_dir)
    for i, extra in enumerate(extra_modules):
        extra_path = run_dir / f"extra_{i}.safetensors"
        if not extra_path.exists():
            raise ResumeError(f"{run_dir}: cannot resume, {extra_path.name} is missing")
        _load_module(extra, load_file(str(extra_path)), "extra module", run_dir)
    restore_optimizer(optimizer, opt, groups)
    return progress
