"""Volume splits: the bundled z-slab table and the slab loader (synthetic volumes; no data needed)."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_graphkd.io.datasets import env_data_root
from napari_graphkd.io.volumes import PARTS, load_slab, read_volume_splits


def test_split_table_cuts_each_volume_into_disjoint_slabs():
    specs = read_volume_splits()
    assert {d for d, _ in specs} == {"em3d_gala", "nuclei3d_lightsheet"}
    for dataset in ("em3d_gala", "nuclei3d_lightsheet"):
        assert all((dataset, part) in specs for part in PARTS)
        slabs = sorted((s.file, s.z_start, s.z_stop) for (d, _), s in specs.items() if d == dataset)
        for (f0, _, stop0), (f1, start1, _) in zip(slabs, slabs[1:]):
            assert f0 != f1 or stop0 <= start1  # no plane in two parts of the same file
    assert specs["em3d_gala", "test"].file != specs["em3d_gala", "train"].file
    assert specs["em3d_gala", "tune"].file == specs["em3d_gala", "train"].file


def _write(folder, name, image, labels):
    for sub, array in (("images", image), ("labels", labels)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / sub / f"{name}.tif", array)


def test_load_slab_returns_the_listed_planes_of_image_and_labels(tmp_path):
    z = np.arange(160, dtype=np.uint8)[:, None, None]
    _write(tmp_path / "nuclei3d_lightsheet", "lightsheet", np.broadcast_to(z, (160, 3, 4)).copy(),
           np.broadcast_to(z.astype(np.uint16) * 10, (160, 3, 4)).copy())
    tune = load_slab(tmp_path, "nuclei3d_lightsheet", "tune")
    assert tune.image.shape == (32, 3, 4) and tune.image[0, 0, 0] == 80 and tune.image[-1, 0, 0] == 111
    assert tune.labels.dtype == np.int32 and tune.labels[0, 0, 0] == 800
    assert tune.voxel_size == (1.0, 1.0, 1.0)
    same = load_slab(tmp_path / "nuclei3d_lightsheet", "nuclei3d_lightsheet", "tune")  # the dataset folder itself
    assert np.array_equal(same.labels, tune.labels)


def test_load_slab_rejects_unknown_parts_missing_folders_and_short_volumes(tmp_path):
    with pytest.raises(ValueError, match="no volume split"):
        load_slab(tmp_path, "em3d_gala", "val")
    with pytest.raises(ValueError, match="em3d_gala/images"):
        load_slab(tmp_path, "em3d_gala", "test")
    _write(tmp_path / "em3d_gala", "test", np.zeros((20, 2, 2), np.uint8), np.zeros((20, 2, 2), np.uint16))
    with pytest.raises(ValueError, match="has 20 planes"):
        load_slab(tmp_path, "em3d_gala", "test")


def test_real_slabs_have_the_listed_shapes_and_annotations():
    """Dev suite: every slab of the two 3D sets loads from $GRAPHKD_DATA with labels in it."""
    root = env_data_root()
    if root is None or not (root / "em3d_gala").is_dir():
        pytest.skip("set GRAPHKD_DATA to the data folder holding em3d_gala/ and nuclei3d_lightsheet/")
    for (dataset, part), spec in read_volume_splits().items():
        slab = load_slab(root, dataset, part)
        assert slab.image.shape == slab.labels.shape and len(slab.image) == spec.z_stop - spec.z_start
        assert len(np.unique(slab.labels)) > 5
