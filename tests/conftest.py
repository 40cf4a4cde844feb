"""Shared fixtures: small real crops from the bundled BBBC039 samples, tiny checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_graphkd.io.checkpoint import save_checkpoint
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.sample_data import load_sample


@pytest.fixture()
def one_thread():
    """One torch thread for the test (tiny tensors: no OpenMP spin contention on a shared 2-core machine; timed
    commands run against it), the previous setting afterwards. Modules use it with ``pytestmark``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample():
    """(image, labels) of a full bundled sample (520x696)."""
    return load_sample("bbbc039_A15_s5")


@pytest.fixture(scope="session")
def crop(sample):
    """A 160x200 real crop (image uint16, labels int32) with several touching nuclei."""
    image, labels = sample
    return image[100:260, 200:400].copy(), labels[100:260, 200:400].copy()


@pytest.fixture()
def crop_folder(tmp_path, sample):
    """Factory: a folder with images/ and labels/ holding four real (h, w) crops of a sample."""

    def make(h: int, w: int):
        import tifffile

        image, labels = sample
        (tmp_path / "images").mkdir()
        (tmp_path / "labels").mkdir()
        for i, (y, x) in enumerate([(0, 0), (0, 300), (250, 0), (250, 300)]):
            tifffile.imwrite(tmp_path / "images" / f"c{i}.tif", image[y : y + h, x : x + w])
            tifffile.imwrite(tmp_path / "labels" / f"c{i}.tif", labels[y : y + h, x : x + w])
        return tmp_path

    return make


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    """A small random half-resolution network saved as a checkpoint."""
    torch.manual_seed(0)
    model = build_model(UNetConfig(widths=(4, 8, 8), stem_stride=2))
    return save_checkpoint(tmp_path / "tiny.safetensors", model, {"name": "tiny"})


def relabel_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images are the same partition (ids may differ), background included."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b)) and ((pairs[0] == 0) == (pairs[1] == 0)).all()
