"""Packaging: the built wheel carries every data file the package needs, and ``graphkd demo`` runs from it.

The wheel is built offline (``--no-isolation``, with the build backend of the running environment) from a
copy of the source, and installed with ``pip --no-deps --no-index --target`` into a folder that the same
interpreter then imports first: a fresh installation of the package without downloading its dependencies.
"""
import fnmatch
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "napari_graphkd"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (the checkout is left untouched)."""
    pytest.importorskip("build")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(source)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (built,) = (tmp / "dist").glob("napari_graphkd-*.whl")
    return built


def package_data_globs() -> list[str]:
    """The ``package-data`` patterns of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["package-data"]["napari_graphkd"]


def test_wheel_holds_weights_samples_manifest_and_split_lists(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*") if p.is_file()]
    data = [f for f in shipped if any(fnmatch.fnmatch(f, g) for g in package_data_globs())]
    assert {"napari.yaml", "weights/student.safetensors", "weights/teacher.safetensors",
            "weights/student-bbbc039.safetensors", "weights/teacher-bbbc039.safetensors",
            "samples/bbbc039_A15_s5.tif", "samples/bbbc039_A15_s5_labels.tif"} <= set(data)
    missing = sorted(f for f in data if f"napari_graphkd/{f}" not in names)
    assert not missing, f"data files missing from the wheel: {missing}"
    split_lists = [f for f in shipped if f.startswith("splits/") and not f.endswith(".py")]
    assert all(f"napari_graphkd/{f}" in names for f in split_lists)  # every split list in the source ships
    dist_info = {Path(n).name: n for n in names if ".dist-info/" in n}
    with zipfile.ZipFile(wheel) as z:
        entry_points = z.read(dist_info["entry_points.txt"]).decode()
        metadata = z.read(dist_info["METADATA"]).decode()
    assert "graphkd = napari_graphkd.cli:main" in entry_points
    assert "napari-graphkd = napari_graphkd:napari.yaml" in entry_points
    assert "Classifier: Framework :: napari" in metadata and "License-Expression: BSD-3-Clause" in metadata


def test_graphkd_demo_runs_from_the_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--disable-pip-version-check", "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(target))
    where = subprocess.run([sys.executable, "-c", "import napari_graphkd; print(napari_graphkd.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(target), f"imported {where.stdout.strip()}, not the installed wheel"
    demo = subprocess.run([str(target / "bin" / "graphkd"), "demo", "--threads", "1"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-2000:]
    rows = [line.split()[0] for line in demo.stdout.splitlines() if line.split()]
    assert {"teacher", "student", "classical"} <= set(rows)
