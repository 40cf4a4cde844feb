"""Resumable run state: model, optimiser moments and progress, all written atomically."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..io.checkpoint import atomic_save_tensors


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via temp file + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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


def save_run_state(run_dir: Path, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
    """Write the optimiser moments and progress (step, history, settings) of a run."""
    tensors, groups = optimizer_tensors(optimizer)
    atomic_save_tensors(tensors, run_dir / "optimizer.safetensors", {"groups": json.dumps(groups)}, overwrite=True)
    atomic_write_text(run_dir / "progress.json", json.dumps(progress, indent=1))


def load_run_state(run_dir: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore the optimiser and return the saved progress, or None for a fresh run."""
    progress_path = run_dir / "progress.json"
    if not progress_path.exists():
        return None
    from safetensors import safe_open

    opt_path = run_dir / "optimizer.safetensors"
    with safe_open(str(opt_path), framework="pt") as f:
        groups = json.loads(f.metadata()["groups"])
    restore_optimizer(optimizer, load_file(str(opt_path)), groups)
    return json.loads(progress_path.read_text())
