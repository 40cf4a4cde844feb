"""File > Open Sample: bundled BBBC039 images with their ground-truth labels."""
from __future__ import annotations

from ..sample_data import load_sample


def _sample(name: str) -> list[tuple]:
    """LayerData tuples: the image and its ground-truth labels (hidden, so the image and results stay readable)."""
    image, labels = load_sample(name)
    return [(image, {"name": name}, "image"), (labels, {"name": f"{name} ground truth", "visible": False}, "labels")]


def bbbc039_p10_s2() -> list[tuple]:
    """BBBC039 IXMtest_P10_s2 (82 nuclei)."""
    return _sample("bbbc039_P10_s2")


def bbbc039_a15_s5() -> list[tuple]:
    """BBBC039 IXMtest_A15_s5 (129 nuclei)."""
    return _sample("bbbc039_A15_s5")


def bbbc039_i15_s5() -> list[tuple]:
    """BBBC039 IXMtest_I15_s5 (185 nuclei)."""
    return _sample("bbbc039_I15_s5")
