"""The bundled checkpoints' metadata names no machine: no absolute or parent-relative paths."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import napari_graphkd
from napari_graphkd.io.checkpoint import read_metadata
from napari_graphkd.segment import BUNDLED

WEIGHTS = Path(napari_graphkd.__file__).parent / "weights"

PATH_START = re.compile(r"(^|[\s=])(/|\.\./|~/|[A-Za-z]:\\)\S")


def strings(value):
    """Every string in a JSON-like value, at any depth."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize("name", list(BUNDLED))
def test_bundled_metadata_holds_no_machine_path(name):
    meta = read_metadata(WEIGHTS / f"{name}.safetensors")
    found = [s for s in strings(meta) if PATH_START.search(s)]
    assert found == []
    assert meta["name"] == name
    data = meta["training_data"]
    if name.endswith("-bbbc039"):  # the specialists: trained on BBBC039 only
        assert data["folder"] == "bbbc039/train"  # relative to the folder laid out by `graphkd data`
        assert "--data DATA/bbbc039" in meta["command"]
    else:  # the generalists: three sources, relative folders, the bundled split lists
        assert [s["folder"] for s in data["sources"]] == ["bbbc039/train", "dsb2018_fluo", "dsb2018_brightfield"]
        assert ("--data DATA/bbbc039/train@bbbc039 --data DATA/dsb2018_fluo@dsb2018_fluo "
                "--data DATA/dsb2018_brightfield@dsb2018_brightfield") in meta["command"]


@pytest.mark.parametrize("student, teacher", [("student", "teacher"), ("student-bbbc039", "teacher-bbbc039")])
def test_bundled_students_record_their_bundled_teacher(student, teacher):
    import hashlib

    record = read_metadata(WEIGHTS / f"{student}.safetensors")["teacher"]
    assert record["path"] == f"src/napari_graphkd/weights/{teacher}.safetensors"
    assert record["sha256_16"] == hashlib.sha256((WEIGHTS / f"{teacher}.safetensors").read_bytes()).hexdigest()[:16]


def test_the_path_check_catches_machine_paths():
    assert [s for s in strings({"a": ["--data /home/me/x", "../other/y", "C:\\data"], "b": "bbbc039/train 0.5/1"})
            if PATH_START.search(s)] == ["--data /home/me/x", "../other/y", "C:\\data"]
