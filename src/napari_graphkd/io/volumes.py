"""Annotated volumes for the 3D benchmarks: the bundled z-slab splits (``splits/volumes.tsv``) and their loader.

A split names, for each dataset and part (train / tune / test), the volume file it comes from, the
z-slab ``[z_start, z_stop)`` and the voxel size (z, y, x) in units of the in-plane pixel. The volumes
themselves are not part of the package: they are read from the data folder given with ``--data``,
laid out as ``<dataset>/images/<file>.tif`` + ``<dataset>/labels/<file>.tif`` (Z, Y, X).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import read_tiff

VOLUME_SPLITS = Path(__file__).resolve().parent.parent / "splits" / "volumes.tsv"
PARTS: tuple[str, ...] = ("train", "tune", "test")


@dataclass(frozen=True)
class SlabSpec:
    """Where one part of a volume split lies: file stem, z range [z_start, z_stop) and voxel size (z, y, x)."""

    dataset: str
    part: str
    file: str
    z_start: int
    z_stop: int
    voxel_size: tuple[float, float, float]


@dataclass(frozen=True)
class VolumeSlab:
    """One slab of an annotated volume: image as stored, int32 instance labels (0 = background), voxel size (z, y, x)."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    voxel_size: tuple[float, float, float]


def read_volume_splits(path: Path = VOLUME_SPLITS) -> dict[tuple[str, str], SlabSpec]:
    """The split table keyed by (dataset, part); ``#`` lines are comments."""
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    specs = {}
    for row in csv.DictReader(lines, delimiter="\t"):
        voxel = tuple(float(row[f"voxel_{axis}"]) for axis in "zyx")
        specs[row["dataset"], row["part"]] = SlabSpec(row["dataset"], row["part"], row["file"], int(row["z_start"]),
                                                      int(row["z_stop"]), voxel)  # type: ignore[arg-type]
    return specs


def dataset_folder(data: str | Path, dataset: str) -> Path:
    """``data/<dataset>``, or ``data`` itself when it is that dataset's folder; ValueError when it lacks images/labels."""
    data = Path(data)
    folder = data if data.name == dataset else data / dataset
    if not ((folder / "images").is_dir() and (folder / "labels").is_dir()):
        raise ValueError(f"no {dataset}/images and {dataset}/labels folders under {data}")
    return folder


def load_slab(data: str | Path, dataset: str, part: str) -> VolumeSlab:
    """The ``part`` slab (train/tune/test) of ``dataset`` from the data folder, cut as the bundled split says."""
    specs = read_volume_splits()
    if (dataset, part) not in specs:
        known = sorted({d for d, _ in specs})
        raise ValueError(f"no volume split {dataset!r}/{part!r} (datasets: {', '.join(known)}; parts: {', '.join(PARTS)})")
    spec = specs[dataset, part]
    folder = dataset_folder(data, dataset)
    image = read_tiff(folder / "images" / f"{spec.file}.tif")
    labels = read_tiff(folder / "labels" / f"{spec.file}.tif")
    if image.ndim != 3 or image.shape != labels.shape:
        raise ValueError(f"{dataset}/{spec.file}: expected same-shaped (Z,Y,X) image and labels, "
                         f"got {image.shape} and {labels.shape}")
    if spec.z_stop > image.shape[0]:
        raise ValueError(f"{dataset}/{spec.file} has {image.shape[0]} planes; the {part} slab needs {spec.z_stop}")
    z = slice(spec.z_start, spec.z_stop)
    return VolumeSlab(f"{dataset}_{part}", np.ascontiguousarray(image[z]), labels[z].astype(np.int32), spec.voxel_size)
