"""Real sample images shipped inside the package (BBBC039 val, CC0), for demos, tests and napari."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import tifffile

SAMPLE_NAMES: tuple[str, ...] = ("bbbc039_P10_s2", "bbbc039_A15_s5", "bbbc039_I15_s5")


def sample_dir() -> Path:
    """Folder holding the bundled sample TIFFs."""
    return Path(str(resources.files("napari_graphkd") / "samples"))


def load_sample(name: str = SAMPLE_NAMES[1]) -> tuple[np.ndarray, np.ndarray]:
    """(image uint16, labels) of a bundled sample."""
    if name not in SAMPLE_NAMES:
        raise ValueError(f"unknown sample {name!r}; available: {', '.join(SAMPLE_NAMES)}")
    folder = sample_dir()
    return tifffile.imread(folder / f"{name}.tif"), tifffile.imread(folder / f"{name}_labels.tif").astype(np.int32)
