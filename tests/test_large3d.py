"""Chunked 3D segmentation of volumes larger than memory: 3D chunks with halos, stitching across faces, resume, CLI.

The fake 3D network of volume_utils (a 3x3x3 mean filter: bright voxels are foreground, the
embedding follows the intensity) stands in for a trained model, so the whole-volume labels are
known and deterministic; workers find it through the per-process model cache.
"""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from napari_graphkd.affinity import offsets_for
from napari_graphkd.cli import main
from napari_graphkd.large import LabelsTarget, from_array, open_image, run_to_end, segment_large
from napari_graphkd.large import run as large_run
from napari_graphkd.large import worker as large_worker
from napari_graphkd.large.chunks import ChunkPlan
from napari_graphkd.large.stats import chunk_stats, combine, plane_normalization
from napari_graphkd.metrics import f1_at
from napari_graphkd.preprocess import normalize
from napari_graphkd.segment import ModelSegmenter, segment_any

from volume_utils import FakeNet3d, volume_checkpoint

SHAPE = (24, 96, 96)
CHUNK = (8, 32, 32)  # 3 x 3 x 3 chunks
HALO = (4, 16, 16)
# ellipsoids centred on chunk corners (crossing three faces) and on z faces, radii (z, y, x)
CENTRES = [(8, 32, 32), (16, 32, 64), (16, 64, 32), (8, 64, 64), (8, 80, 12), (16, 12, 80)]
RADII = (3.5, 8.0, 8.0)


def blob_volume() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 volume, int32 truth) of bright ellipsoids that cross chunk borders, on a dark noisy background."""
    rng = np.random.default_rng(0)
    grid = np.indices(SHAPE)
    volume, truth = 20 + rng.normal(0, 3, SHAPE), np.zeros(SHAPE, np.int32)
    for i, centre in enumerate(CENTRES, 1):
        r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, RADII))
        truth[r2 <= 1] = i
        volume += np.where(r2 <= 1, 180 - 60 * r2, 0)
    return np.clip(volume, 0, 255).astype(np.uint8), truth


@pytest.fixture()
def fake3d(monkeypatch):
    """The fake network as model ``fake3d`` for the chunk workers (threads of this process)."""
    segmenter = ModelSegmenter(model=FakeNet3d(), metadata={"name": "fake3d", "voxel_size": [1.0, 1.0, 1.0],
                                                             "offsets": [list(o) for o in offsets_for(3)]})
    original = large_worker.cached_segmenter
    monkeypatch.setattr(large_worker, "cached_segmenter", lambda spec: segmenter if spec == "fake3d" else original(spec))
    return segmenter


@pytest.fixture(scope="module")
def volume():
    return blob_volume()


def chunked_labels(volume: np.ndarray, path, **kw) -> np.ndarray:
    """Labels of ``volume`` segmented by ``fake3d`` in CHUNK chunks with HALO, read back from the Zarr array."""
    target = LabelsTarget(str(path))
    last = run_to_end(segment_large(from_array(volume), target, "fake3d", chunk=CHUNK, halo=HALO, tile=200, **kw))
    assert last.stage == "done" and not target.work.exists()
    return zarr.open_array(target.path, mode="r")[:]


def test_chunked_volume_labels_agree_with_whole_volume_labels(fake3d, volume, tmp_path):
    whole = segment_any(fake3d, volume[0], tile=200).labels
    chunked = chunked_labels(volume[0], tmp_path / "l.zarr")
    assert chunked.shape == SHAPE and chunked.dtype == np.int32
    assert len(np.unique(whole)) - 1 == len(CENTRES)
    # Objects matched at IoU 0.5. The network is deterministic with a one-voxel reach, every chunk is normalised with
    # the exact whole-volume statistics and starts on the decoder's grid, so only the decoder's longest offsets
    # (27 px) beyond the 16 px halo could change a label; one unmatched object of six would give F1 <= 0.91.
    assert f1_at(whole, chunked) >= 0.99
    both, either = np.sum((whole > 0) & (chunked > 0)), np.sum((whole > 0) | (chunked > 0))
    assert both / either >= 0.99  # the same foreground voxels
    ids = np.unique(chunked)
    assert ids[-1] == len(ids) - 1  # global ids 1..N, none skipped


def test_a_voxel_size_rescales_each_chunk_as_the_whole_volume(fake3d, volume, tmp_path):
    whole = segment_any(fake3d, volume[0], voxel_size=(2, 1, 1)).labels  # z stretched 2x to isotropic voxels
    target = LabelsTarget(str(tmp_path / "l.zarr"))
    assert run_to_end(segment_large(from_array(volume[0]), target, "fake3d", chunk=(8, 48, 48), halo=HALO,
                                    voxel_size=(2.0, 1.0, 1.0))).stage == "done"
    labels = zarr.open_array(target.path, mode="r")
    assert labels.attrs["graphkd"]["zoom"] == [2.0, 1.0, 1.0] and labels.shape == SHAPE
    # each chunk is rescaled on its own (interpolation at its faces differs slightly from the whole volume's)
    assert f1_at(whole, labels[:]) >= 0.99 and np.mean((whole > 0) != (labels[:] > 0)) < 0.002


def test_no_object_is_split_at_chunk_faces(fake3d, volume, tmp_path):
    chunked = chunked_labels(volume[0], tmp_path / "l.zarr")
    truth = volume[1]
    plan = ChunkPlan(1, SHAPE, CHUNK, HALO)
    owners = set()
    for obj in range(1, len(CENTRES) + 1):
        crossed = {c.key for c in plan.chunks() if np.any(truth[tuple(slice(a, b) for a, b in zip(c.core[::2], c.core[1::2]))] == obj)}
        assert len(crossed) >= 2  # every object lies in several chunks (corner ones in eight)
        ids = np.unique(chunked[(truth == obj) & (chunked > 0)])
        assert len(ids) == 1  # one id across every face it crosses
        owners.add(int(ids[0]))
    assert len(owners) == len(CENTRES)  # and no two objects share one


def test_whole_volume_statistics_equal_the_in_memory_normalisation():
    rng = np.random.default_rng(1)
    volume = rng.integers(100, 4000, (10, 37, 29)).astype(np.uint16)
    plan = ChunkPlan(1, volume.shape, (4, 16, 8), 0)
    parts = []
    for c in plan.chunks():
        z0, z1, y0, y1, x0, x1 = c.core
        parts.append(chunk_stats(volume[z0:z1, y0 : min(y1 + 1, volume.shape[1]), x0:x1], z0, y1 - y0))
    offset, scale = plane_normalization(combine(parts))
    expected = normalize(volume.astype(np.float32))
    got = ((volume.astype(np.float32) - np.float64(offset)) / np.float64(scale)).astype(np.float32)
    assert np.array_equal(got, expected)


def test_stopped_volume_run_resumes_and_skips_finished_chunks(fake3d, volume, tmp_path, monkeypatch):
    complete = chunked_labels(volume[0], tmp_path / "full.zarr")
    target = LabelsTarget(str(tmp_path / "l.zarr"))
    seen = []
    original = large_run.segment_chunk
    monkeypatch.setattr(large_run, "segment_chunk", lambda job: seen.append(job.chunk.key) or original(job))
    steps = segment_large(from_array(volume[0]), target, "fake3d", chunk=CHUNK, halo=HALO, tile=200,
                          should_stop=lambda: len(seen) >= 5)
    stages = [p.stage for p in steps]
    assert stages[-1] == "stopped" and target.work.exists() and len(seen) == 5
    first = list(seen)
    assert run_to_end(segment_large(from_array(volume[0]), target, "fake3d", chunk=CHUNK, halo=HALO, tile=200)).stage == "done"
    assert len(seen) == 27 and not set(first) & set(seen[5:])  # the 22 others, each once
    assert np.array_equal(zarr.open_array(target.path, mode="r")[:], complete)


def test_default_halo_follows_the_anisotropy_and_the_voxel_size():
    facts = {"zoom": [1.0, 1.0, 1.0], "align": [4, 8, 8], "anisotropy": 4.0, "diameter": 28.0, "reach": [7, 27, 27]}
    chunk, halo = large_run.volume_geometry(facts, None, None)
    assert chunk == (40, 160, 160) and halo == (24, 64, 64)  # z: a quarter of the in-plane extent, on the z grid
    rescaled = dict(facts, zoom=[4.0, 1.0, 1.0], anisotropy=1.0, reach=[27, 27, 27])  # z steps 4x the pixel size
    assert large_run.volume_geometry(rescaled, 128, None) == ((32, 128, 128), (16, 64, 64))
    assert large_run.volume_geometry(facts, (6, 30, 30), (2, 9, 9)) == ((8, 32, 32), (4, 16, 16))  # rounded up


def test_cli_segments_a_zarr_volume_with_a_3d_model_in_chunks(fake3d, volume, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("napari_graphkd.segment.load_segmenter", lambda spec: fake3d)
    path = tmp_path / "vol.zarr"
    zarr.create_array(str(path), data=volume[0], chunks=(8, 48, 48))
    out = tmp_path / "out.zarr"
    args = ["segment", str(path), "--model", "fake3d", "--chunk", "8,32,32", "--halo", "4,16,16", "--tile", "200",
            "--workers", "0", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    assert f"{len(CENTRES)} objects" in capsys.readouterr().out
    labels = zarr.open_array(str(out), mode="r")
    assert labels.chunks == CHUNK and labels.attrs["graphkd"]["volume"] is True
    assert f1_at(segment_any(fake3d, volume[0], tile=200).labels, labels[:]) >= 0.99
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # never overwritten without --overwrite


def test_a_volume_over_the_in_memory_limit_takes_the_chunked_path(fake3d, volume, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("napari_graphkd.segment.load_segmenter", lambda spec: fake3d)
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "v.tif", volume[0])
    common = ["--model", "fake3d", "--chunk", "8,32,32", "--halo", "4,16,16", "--tile", "200", "--workers", "0",
              "--threads", "1", "--out", str(tmp_path / "out")]
    assert main(["segment", str(folder / "v.tif"), *common]) == 0  # fits in memory: a TIFF of labels
    whole = tifffile.imread(tmp_path / "out" / "v.tif")
    monkeypatch.setattr("napari_graphkd.inference.MAX_WORKING_VOXELS", 100_000)  # now the volume (221k voxels) does not
    assert main(["segment", str(folder / "v.tif"), *common]) == 0
    assert "v.zarr" in capsys.readouterr().out
    assert f1_at(whole, zarr.open_array(str(tmp_path / "out" / "v.zarr"), mode="r")[:]) >= 0.99


def test_chunked_3d_input_errors_are_one_line(fake3d, volume, tmp_path, capsys):
    path = tmp_path / "plane.zarr"
    zarr.create_array(str(path), data=volume[0][0], chunks=(48, 48))
    assert main(["segment", str(path), "--model", "fake3d", "--workers", "0", "--out", str(tmp_path / "o.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["graphkd segment: error: a 3D model segments (Z,Y,X) volumes; the image has axes 'yx' and shape (96, 96)"]
    assert main(["segment", str(path), "--model", "classical", "--3d", "--workers", "0",
                 "--out", str(tmp_path / "o.zarr")]) == 2
    assert "--3d needs a 3D model" in capsys.readouterr().err
    assert main(["segment", str(path), "--model", "student", "--chunk", "8,32,32", "--diameter", "28", "--invert", "no",
                 "--workers", "0", "--out", str(tmp_path / "o.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "three chunk or halo sizes (Z,Y,X) apply to 3D models" in err[0]
    with pytest.raises(SystemExit):
        main(["segment", str(path), "--chunk", "8,32", "--out", str(tmp_path / "o.zarr")])
    assert capsys.readouterr().err.count("\n") == 1


def test_a_3d_checkpoint_runs_chunk_by_chunk_into_zarr(tmp_path):
    """A real (tiny, untrained) 3D U-Net checkpoint loads in the workers and fills every voxel of the output."""
    checkpoint = volume_checkpoint(tmp_path / "tiny3d.safetensors")
    image = blob_volume()[0][:12, :48, :40]
    zarr.create_array(str(tmp_path / "v.zarr"), data=image)
    source = open_image(tmp_path / "v.zarr")
    target = LabelsTarget(str(tmp_path / "l.zarr"))
    last = run_to_end(segment_large(source, target, str(checkpoint), chunk=(8, 24, 24), halo=(4, 8, 8), tile=300,
                                    voxel_size=(2.0, 1.0, 1.0)))
    assert last.stage == "done" and last.done == 2 * 2 * 2
    labels = zarr.open_array(target.path, mode="r")
    assert labels.shape == image.shape and labels.attrs["graphkd"]["zoom"] == [1.0, 1.0, 1.0]


def test_a_series_is_segmented_volume_by_volume_with_ids_unique_across_volumes(fake3d, volume, tmp_path):
    series = np.stack([volume[0], volume[0][:, ::-1]])  # (T,Z,Y,X)
    whole = segment_any(fake3d, series, tile=200).labels
    target = LabelsTarget(str(tmp_path / "s.zarr"))
    last = run_to_end(segment_large(from_array(series), target, "fake3d", chunk=(8, 48, 48), halo=HALO, tile=200))
    assert last.stage == "done" and last.total == 2 * 3 * 2 * 2  # chunks per volume: 3 in z, 2 in y, 2 in x
    labels = zarr.open_array(target.path, mode="r")
    assert labels.shape == series.shape and labels.chunks == (1, 8, 48, 48)
    assert all(f1_at(whole[t], labels[t]) >= 0.99 for t in range(2))
    assert not set(np.unique(labels[0])[1:]) & set(np.unique(labels[1])[1:])
