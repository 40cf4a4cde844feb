"""Rewrite machine-specific paths in the bundled checkpoints' metadata to data-layout-relative forms.

Paths in ``training_data.folder`` (and each source's ``folder``/``tune_folder``) and ``command``
become relative to the data folder laid out by ``graphkd data`` (``bbbc039/train``, ``--data
DATA/bbbc039/train``), run folders become ``runs/...`` and bundled weights
``src/napari_graphkd/weights/...``. ``--rename OLD=NEW`` (cleaned paths, applied in order) follows a
file since renamed or copied into the package in the recorded teacher, initialisation and command; ``--name FILE=NAME`` sets a checkpoint's name. The tensors are written back unchanged (checked value by value and byte by byte);
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
DATA_PREFIX = re.compile(r"[^\s\"'=@]*/(?=bbbc039|dsb2018)")  # any folder path in front of a dataset name
RUNS_PREFIX = re.compile(r"/[^\s\"'@]*?/runs/")
PACKAGE_PREFIX = re.compile(r"[^\s\"'=]*/(?=src/napari_graphkd/)")  # a checkout's path in front of the package


def clean_command(command: str) -> str:
    """``--data /any/where/data/bbbc039`` -> ``--data DATA/bbbc039``; ``/any/where/runs/x`` -> ``runs/x``."""
    return PACKAGE_PREFIX.sub("", RUNS_PREFIX.sub("runs/", DATA_PREFIX.sub("DATA/", command)))


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


def renamed(text: str, renames: dict[str, str]) -> str:
    """``text`` with each recorded path OLD in ``renames`` replaced by NEW, in the order given (a file since renamed)."""
    for old, new in renames.items():
        text = text.replace(old, new)
    return text


def clean(path: Path, teacher_digests: dict[str, str], renames: dict[str, str] | None = None,
          name: str | None = None) -> bool:
    """Rewrite one checkpoint's metadata in place; True if it changed."""
    renames = renames or {}
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    meta = json.loads(raw[METADATA_KEY])
    before = json.dumps(meta, sort_keys=True)
    data = meta.get("training_data", {})
    if data.get("folder"):
        data["folder"] = clean_folder(data["folder"])
    for source in data.get("sources") or []:
        for key in ("folder", "tune_folder"):
            if source.get(key):
                source[key] = clean_folder(source[key])
    for key in ("command", "init_checkpoint"):
        if meta.get(key):
            meta[key] = renamed(clean_command(meta[key]), renames)
    teacher = meta.get("teacher", {})
    if teacher.get("path"):
        teacher["path"] = renamed(clean_command(teacher["path"]), renames)
    if teacher.get("path") in teacher_digests:  # a bundled teacher cleaned in this run: its name and new digest
        teacher["name"], teacher["sha256_16"] = teacher_digests[teacher["path"]].split(":", 1)
    elif teacher.get("sha256_16") in teacher_digests:
        teacher["sha256_16"] = teacher_digests[teacher["sha256_16"]]
    if name:
        meta["name"] = name
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
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="a recorded (cleaned) path OLD now at NEW, e.g. src/napari_graphkd/weights/teacher.safetensors="
                             "src/napari_graphkd/weights/teacher-bbbc039.safetensors; applied in order")
    parser.add_argument("--name", action="append", default=[], metavar="FILE=NAME", help="set FILE's checkpoint name")
    args = parser.parse_args()
    renames = dict(item.split("=", 1) for item in args.rename)
    names = dict(item.split("=", 1) for item in args.name)
    digests: dict[str, str] = {}
    for path in sorted(args.paths, key=lambda p: "teacher" not in p.name):
        old = file_digest(path)
        changed = clean(path, digests, renames, names.get(path.name))
        digests[old] = file_digest(path)
        if path.resolve().parent == WEIGHTS.resolve():
            name = json.loads(safe_open(str(path), framework="pt").metadata()[METADATA_KEY]).get("name", path.stem)
            digests[f"src/napari_graphkd/weights/{path.name}"] = f"{name}:{digests[old]}"
        with safe_open(str(path), framework="pt") as f:
            left = absolute_paths(json.loads(f.metadata()[METADATA_KEY]))
        print(f"{path.name}: {'rewritten' if changed else 'unchanged'}; paths left: {left or 'none'}")
        if left:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
