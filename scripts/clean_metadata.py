"""Rewrite machine-specific paths in the bundled checkpoints' metadata to data-layout-relative forms.

Paths in ``training_data.folder`` and ``command`` become relative to the data folder laid out by
``graphkd data`` (``bbbc039/train``, ``--data DATA/bbbc039/train``) and run folders become
``runs/...``. The tensors are written back unchanged (checked value by value and byte by byte);
the student's record of its teacher digest follows the rewritten teacher file. Idempotent.

    python scripts/clean_metadata.py [src/napari_graphkd/weights/*.safetensors]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from napari_graphkd.io.checkpoint import METADATA_KEY, atomic_save_tensors

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "napari_graphkd" / "weights"
DATA_PREFIX = re.compile(r"[^\s\"'=]*/(?=bbbc039|dsb2018)")  # any folder path in front of a dataset name
RUNS_PREFIX = re.compile(r"/[^\s\"']*?/runs/")


def clean_command(command: str) -> str:
    """``--data /any/where/data/bbbc039`` -> ``--data DATA/bbbc039``; ``/any/where/runs/x`` -> ``runs/x``."""
    return RUNS_PREFIX.sub("runs/", DATA_PREFIX.sub("DATA/", command))


def clean_folder(folder: str) -> str:
    """``/any/where/data/bbbc039/train`` -> ``bbbc039/train`` (already relative forms are kept)."""
    return clean_command(folder).removeprefix("DATA/")


def absolute_paths(value, where: str = "") -> list[str]:
    """Every metadata string (at any depth) that holds an absolute or parent-relative path."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in absolute_paths(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in absolute_paths(v, f"{where}[{i}]")]
    if isinstance(value, str) and re.search(r"(^|[\s=])(/|\.\./|~/)\S", value):
        return [f"{where}: {value}"]
    return []


def file_digest(path: Path) -> str:
    """First 16 hex digits of the file's SHA-256 (how a student records its teacher)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def clean(path: Path, teacher_digests: dict[str, str]) -> bool:
    """Rewrite one checkpoint's metadata in place; True if it changed."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    meta = json.loads(raw[METADATA_KEY])
    before = json.dumps(meta, sort_keys=True)
    data = meta.get("training_data", {})
    if "folder" in data:
        data["folder"] = clean_folder(data["folder"])
    if "command" in meta:
        meta["command"] = clean_command(meta["command"])
    teacher = meta.get("teacher", {})
    if teacher.get("sha256_16") in teacher_digests:
        teacher["sha256_16"] = teacher_digests[teacher["sha256_16"]]
    if json.dumps(meta, sort_keys=True) == before:
        return False
    tensors = load_file(str(path))
    atomic_save_tensors(tensors, path, {**raw, METADATA_KEY: json.dumps(meta)}, overwrite=True)
    if not same_bytes(tensors, load_file(str(path))):
        raise SystemExit(f"{path}: tensors changed on rewrite")
    return True


def same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same tensor names, dtypes, shapes and bytes."""
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(-1).view(torch.uint8)

    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and raw(a[k]).equal(raw(b[k]))
                                        for k in a)


def main() -> int:
    """Clean the given checkpoints (teachers first, so students can follow their digest)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=sorted(WEIGHTS.glob("*.safetensors")))
    args = parser.parse_args()
    digests: dict[str, str] = {}
    for path in sorted(args.paths, key=lambda p: "teacher" not in p.name):
        old = file_digest(path)
        changed = clean(path, digests)
        digests[old] = file_digest(path)
        with safe_open(str(path), framework="pt") as f:
            left = absolute_paths(json.loads(f.metadata()[METADATA_KEY]))
        print(f"{path.name}: {'rewritten' if changed else 'unchanged'}; paths left: {left or 'none'}")
        if left:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
