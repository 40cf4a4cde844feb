"""Chunked out-of-core segmentation: stitched labels equal whole-image labels, Zarr/OME-Zarr/TIFF in and out, resume, errors."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import zarr
from scipy import ndimage as ndi

from napari_graphkd.cli import main
from napari_graphkd.large import ChunkError, LabelsTarget, from_array, open_image, run_to_end, segment_large
from napari_graphkd.large import run as large_run
from napari_graphkd.large import worker as large_worker
from napari_graphkd.large.chunks import ChunkPlan
from napari_graphkd.large.stats import chunk_stats, combine, plane_normalization
from napari_graphkd.large.stitch import global_ids, matching_pairs
from napari_graphkd.metrics import f1_at
from napari_graphkd.preprocess import InputError, normalize
from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample
from napari_graphkd.segment import load_segmenter, segment_any

CHUNK = 256


@pytest.fixture(scope="module")
def mosaic():
    """A 2 x 2 mosaic (768 x 1024) of real crops of the bundled samples, and its whole-image student labels."""
    torch.set_num_threads(1)
    crops = [load_sample(name)[0][:384, :512] for name in SAMPLE_NAMES]
    image = np.block([[crops[0], crops[1]], [crops[2], crops[0][:, ::-1]]])
    return image, segment_any(load_segmenter("student"), image).labels


@pytest.fixture(scope="module")
def chunked(mosaic, tmp_path_factory):
    """The mosaic segmented in 256 px chunks on one thread, read back from its Zarr array."""
    target = LabelsTarget(str(tmp_path_factory.mktemp("chunked") / "labels.zarr"))
    last = run_to_end(segment_large(from_array(mosaic[0]), target, "student", chunk=CHUNK, workers=1))
    assert last.stage == "done" and not target.work.exists()
    return zarr.open_array(target.path, mode="r")[:]


def test_chunked_labels_agree_with_whole_image_labels(mosaic, chunked):
    _, whole = mosaic
    assert chunked.shape == whole.shape and chunked.dtype == np.int32
    assert f1_at(whole, chunked) >= 0.995
    assert abs(len(np.unique(chunked)) - len(np.unique(whole))) <= 2


def test_no_object_is_cut_along_a_chunk_border(mosaic, chunked):
    _, whole = mosaic
    lines = np.zeros(whole.shape, dtype=bool)
    lines[CHUNK::CHUNK] = lines[:, CHUNK::CHUNK] = True  # first row/column of each chunk
    crossing = np.unique(whole[lines & (whole > 0)])
    assert crossing.size > 20  # the mosaic has many nuclei on chunk lines
    split = 0
    for obj in crossing:
        ids, counts = np.unique(chunked[whole == obj], return_counts=True)
        share = counts[ids > 0] / counts.sum()
        split += int(np.sum(share >= 0.2) > 1)  # two ids each holding a fifth of one nucleus
    assert split == 0


def scattered_ids(labels: np.ndarray) -> set[tuple]:
    """Bounding boxes of the ids whose pixels form more than one 8-connected piece."""
    return {tuple((s.start, s.stop) for s in box) for i, box in enumerate(ndi.find_objects(labels), start=1)
            if box is not None and ndi.label(labels[box] == i, np.ones((3, 3)))[1] > 1}


def test_stitching_gives_no_id_to_two_separate_objects(mosaic, chunked):
    assert scattered_ids(chunked) <= scattered_ids(mosaic[1])  # only the decoder's own (rare) scattered objects
    ids = np.unique(chunked)
    assert ids[-1] == len(ids) - 1  # ids 1..N, none skipped


def test_whole_plane_statistics_equal_the_whole_image_normalisation(sample):
    image = sample[0]
    plan = ChunkPlan(1, image.shape, 200, 0)
    parts = [chunk_stats(image[c.core[0] : c.core[1], c.core[2] : min(c.core[3] + 1, image.shape[1])], c.core[0],
                         c.core[3] - c.core[2]) for c in plan.chunks()]
    offset, scale = plane_normalization(combine(parts))
    expected = normalize(image)
    assert np.array_equal(((image.astype(np.float32) - np.float64(offset)) / np.float64(scale)).astype(np.float32), expected)
    inv_offset, inv_scale = plane_normalization(combine(parts), invert=True)
    gray = np.float32(image.max()) - image.astype(np.float32)
    np.testing.assert_allclose((gray - inv_offset) / inv_scale, normalize(gray), atol=1e-6)


def test_matching_merges_an_object_crossing_the_border_and_numbers_ids_once():
    a = np.zeros((6, 8), np.int32)
    b = np.zeros((6, 8), np.int32)
    a[1:5, 2:7], b[1:5, 2:6] = 1, 3  # the same nucleus seen from two chunks
    a[0, 0], b[5, 7] = 2, 1  # unrelated specks
    pairs = matching_pairs(a, b, np.ones(a.shape, bool))
    assert pairs.tolist() == [[1, 3]]
    # chunk 0 has ids 1..2 (1 in its core), chunk 1 has ids 1..3 (1 and 3 in its core); node = offset + id
    tables = global_ids([2, 3], [np.array([1]), np.array([1, 3])], np.array([[1, 3 + 3]]))
    assert tables[0][1] == tables[1][3] == 1 and tables[1][1] == 2 and tables[1][2] == 0


def test_stopped_run_resumes_and_skips_finished_chunks(mosaic, chunked, tmp_path, monkeypatch):
    image = mosaic[0][:512, :768]
    target = LabelsTarget(str(tmp_path / "l.zarr"))
    seen = []
    original = large_run.segment_chunk
    monkeypatch.setattr(large_run, "segment_chunk", lambda job: seen.append(job.chunk.key) or original(job))
    stages = [p.stage for p in segment_large(from_array(image), target, "student", chunk=CHUNK, should_stop=lambda: len(seen) >= 2)]
    assert stages[-1] == "stopped" and target.work.exists() and len(seen) == 2
    first = list(seen)
    last = run_to_end(segment_large(from_array(image), target, "student", chunk=CHUNK))
    assert last.stage == "done" and len(seen) == 6 and not set(first) & set(seen[2:])
    labels = zarr.open_array(target.path, mode="r")[:]
    assert f1_at(chunked[:512, :768], labels) > 0.95  # the crop's own border changes a few objects


def test_a_failing_chunk_names_itself_in_one_line_and_keeps_finished_ones(mosaic, tmp_path, monkeypatch):
    target = LabelsTarget(str(tmp_path / "l.zarr"))
    original = large_worker.chunk_labels

    def broken(job, pixels):
        if job.chunk.key == "0_1_1":
            raise MemoryError("out of memory")
        return original(job, pixels)

    monkeypatch.setattr(large_worker, "chunk_labels", broken)
    with pytest.raises(ChunkError) as info:
        run_to_end(segment_large(from_array(mosaic[0][:512, :512]), target, "student", chunk=CHUNK))
    message = str(info.value)
    assert "\n" not in message and "chunk 0_1_1" in message and "rows 256:512, cols 256:512" in message and "MemoryError" in message
    assert (target.work / "chunks").exists()


def test_cli_segments_an_ome_zarr_into_its_labels_group(tmp_path, capsys):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader
    from ome_zarr.writer import write_image

    image = load_sample(SAMPLE_NAMES[0])[0][:300, :400]
    path = tmp_path / "plate.ome.zarr"
    write_image(image[None], zarr.open_group(str(path), mode="w"), axes="cyx", scaler=None)
    args = ["segment", str(path), "--model", "student", "--chunk", str(CHUNK), "--workers", "0", "--threads", "1"]
    assert main(args) == 0
    assert "objects" in capsys.readouterr().out
    nodes = list(Reader(parse_url(str(path)))())
    labels = [n for n in nodes if n.load(Label)]
    assert labels and np.asarray(labels[0].data[0]).shape == (300, 400)
    whole = segment_any(load_segmenter("student"), image).labels
    assert f1_at(whole, np.asarray(labels[0].data[0])) >= 0.995
    assert main(args) == 2  # the labels exist now: never overwritten without --overwrite
    assert "exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert zarr.open_group(str(path / "labels"), mode="r").attrs["ome"]["labels"] == ["graphkd"]


def test_cli_reads_a_tiled_tiff_lazily_into_a_zarr(tmp_path, sample):
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, sample[0], tile=(128, 128))
    source = open_image(path)
    assert source.kind == "tiff" and source.plane_shape == sample[0].shape
    out = tmp_path / "res"
    assert main(["segment", str(path), "--chunked", "--model", "student", "--chunk", "256", "--workers", "0",
                 "--threads", "1", "--out", str(out)]) == 0
    labels = zarr.open_array(str(out / "big.zarr"), mode="r")
    assert labels.chunks == (256, 256)
    assert f1_at(segment_any(load_segmenter("student"), sample[0]).labels, labels[:]) >= 0.995


def test_two_worker_local_cluster_gives_the_same_labels(mosaic, chunked, tmp_path):
    from distributed import Client, LocalCluster

    image = mosaic[0][:512, :768]
    path = tmp_path / "in.zarr"
    zarr.create_array(str(path), data=image, chunks=(256, 256))
    target = LabelsTarget(str(tmp_path / "out.zarr"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        last = run_to_end(segment_large(open_image(path), target, "student", chunk=CHUNK,
                                        executor=large_run.DaskExecutor(client)))
    assert last.stage == "done"
    local = run_to_end(segment_large(from_array(image), LabelsTarget(str(tmp_path / "here.zarr")), "student", chunk=CHUNK))
    assert local.message == last.message
    a, b = zarr.open_array(target.path)[:], zarr.open_array(str(tmp_path / "here.zarr"))[:]
    assert np.array_equal(a, b)


def test_a_stack_is_segmented_plane_by_plane_with_ids_unique_across_planes(tmp_path):
    import dask.array as da

    planes = [load_sample(name)[0][:256, :320] for name in SAMPLE_NAMES[:2]]
    stack = da.from_array(np.stack(planes), chunks=(1, 128, 128))
    target = LabelsTarget(str(tmp_path / "s.zarr"))
    assert run_to_end(segment_large(from_array([stack, stack[:, ::2, ::2]]), target, "student", chunk=CHUNK)).stage == "done"
    labels = zarr.open_array(target.path, mode="r")[:]
    whole = segment_any(load_segmenter("student"), np.stack(planes)).labels
    assert labels.shape == (2, 256, 320) and all(f1_at(whole[i], labels[i]) >= 0.995 for i in range(2))
    assert not set(np.unique(labels[0])[1:]) & set(np.unique(labels[1])[1:])


def test_a_diameter_that_would_blow_up_each_chunk_is_refused(tmp_path, sample, capsys):
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, sample[0], tile=(128, 128))
    out = tmp_path / "res"
    assert main(["segment", str(path), "--chunked", "--model", "student", "--chunk", "256", "--workers", "0",
                 "--threads", "1", "--diameter", "0.01", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nucleus diameter 0.01" in err[0]
    assert not (out / "big.zarr").exists()
    target = LabelsTarget(str(tmp_path / "lib.zarr"))
    with pytest.raises(InputError, match="nucleus diameter 0.01 rescales each .* smaller --chunk"):
        run_to_end(segment_large(open_image(path), target, "student", chunk=256, diameter=0.01))
    assert not (tmp_path / "lib.zarr").exists()
