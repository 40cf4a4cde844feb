"""`graphkd data`: layout from laid-out folders and from the public archive formats, checksums, verification."""
from __future__ import annotations

import io
import zipfile

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_graphkd.cli import main
from napari_graphkd.io import datasets
from napari_graphkd.io.datasets import (
    Entry,
    build,
    canonical_labels,
    entries,
    env_data_root,
    image_sha256,
    index_sources,
    labels_sha256,
    verify,
)

DSB_ID = "ab" * 32  # DSB 2018 image ids are 64 hex digits


def _pair(seed: int, shape=(12, 16)) -> tuple[np.ndarray, np.ndarray]:
    """A small image and a label image with two nuclei."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 4000, shape, dtype=np.uint16)
    labels = np.zeros(shape, np.uint16)
    labels[2:5, 2:6] = 7
    labels[6:10, 8:14] = 3
    return image, labels


def _entry(dataset: str, split: str, stem: str, image: np.ndarray, labels: np.ndarray) -> Entry:
    return Entry(dataset, split, stem, image_sha256(image), labels_sha256(labels))


def test_label_checksum_ignores_ids_but_not_the_partition():
    _, labels = _pair(0)
    permuted = np.where(labels == 7, 1, np.where(labels == 3, 9, 0)).astype(np.uint32)
    assert labels_sha256(permuted) == labels_sha256(labels)
    assert canonical_labels(labels)[2, 2] == 1 and canonical_labels(labels)[6, 8] == 2
    merged = (labels > 0).astype(np.uint16)
    assert labels_sha256(merged) != labels_sha256(labels)
    image, _ = _pair(0)
    assert image_sha256(image) != image_sha256(image.astype(np.uint32))  # dtype is part of an image


def test_build_from_a_laid_out_folder_then_verify(tmp_path):
    source, root = tmp_path / "downloaded", tmp_path / "layout"
    todo = []
    for i, split in enumerate(["train", "val"]):
        image, labels = _pair(i)
        for kind, array in (("images", image), ("labels", labels)):
            (source / "bbbc039" / split / kind).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(source / "bbbc039" / split / kind / f"s{i}.tif", array)
        todo.append(_entry("bbbc039", "tune" if i == 0 else "val", f"s{i}", image, labels))
    report = build(root, index_sources([source]), todo)
    assert (report.written, report.kept, report.missing, report.different) == (2, 0, [], [])
    image_path, labels_path = todo[0].paths(root)
    assert image_path == root / "bbbc039" / "tune" / "images" / "s0.tif"
    np.testing.assert_array_equal(tifffile.imread(image_path), _pair(0)[0])
    assert verify(root, todo) == []
    assert build(root, index_sources([source]), todo).kept == 2  # a second run keeps verified files
    tifffile.imwrite(labels_path, np.zeros((12, 16), np.uint16))  # a user's edit is detected, not overwritten
    assert verify(root, todo) == ["bbbc039/tune/s0 (labels)"]
    report = build(root, index_sources([source]), todo)
    assert report.different and "--overwrite" in report.different[0]
    assert build(root, index_sources([source]), todo, overwrite=True).written == 1
    assert verify(root, todo) == []


def test_bbbc039_archives_colour_masks_become_instances(tmp_path):
    image, labels = _pair(3)
    mask = np.zeros((*labels.shape, 3), np.uint8)
    mask[labels == 7] = (255, 0, 0)
    mask[labels == 3] = (0, 255, 0)
    mask[10:12, 0:3] = (255, 0, 0)  # same colour, not touching the first nucleus: a third instance
    labels3 = labels.copy()
    labels3[10:12, 0:3] = 5
    buf = io.BytesIO()
    tifffile.imwrite(buf, image)
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        z.writestr("images/IXM_s1.tif", buf.getvalue())
    with zipfile.ZipFile(tmp_path / "masks.zip", "w") as z:
        z.writestr("masks/IXM_s1.png", iio.imwrite("<bytes>", mask, extension=".png"))
        z.writestr("__MACOSX/masks/._IXM_s1.png", b"not an image")
    todo = [_entry("bbbc039", "train", "IXM_s1", image, labels3)]
    report = build(tmp_path / "out", index_sources([tmp_path]), todo)
    assert (report.written, report.different) == (1, [])
    assert len(np.unique(tifffile.imread(todo[0].paths(tmp_path / "out")[1]))) == 4


def test_dsb_masks_fixed_ones_win_and_rgb_becomes_grey(tmp_path):
    grey = np.random.default_rng(1).integers(0, 255, (12, 16), dtype=np.uint8)
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    _, labels = _pair(0)
    for top, nuclei in (("stage1_train", [labels > 0]), ("dataset-fixes-master/stage1_train", [labels == 7, labels == 3])):
        folder = tmp_path / "src" / top / DSB_ID
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        iio.imwrite(folder / "images" / f"{DSB_ID}.png", rgba)
        for k, nucleus in enumerate(nuclei):
            iio.imwrite(folder / "masks" / f"m{k}.png", (nucleus * 255).astype(np.uint8))
    todo = [_entry("dsb2018_brightfield", "", DSB_ID, grey, labels)]
    report = build(tmp_path / "out", index_sources([tmp_path / "src"]), todo)
    assert (report.written, report.different) == (1, [])
    assert tifffile.imread(todo[0].paths(tmp_path / "out")[0]).dtype == np.uint8
    wrong = [_entry("dsb2018_brightfield", "", DSB_ID, grey, (labels > 0).astype(np.uint16))]
    assert build(tmp_path / "out2", index_sources([tmp_path / "src"]), wrong).different == [f"dsb2018_brightfield/{DSB_ID} (labels)"]


def test_package_lists_and_manifest_agree():
    todo = entries()
    by_split = {}
    for e in todo:
        by_split.setdefault((e.dataset, e.split), set()).add(e.stem)
    assert {k: len(v) for k, v in by_split.items() if k[0] == "bbbc039"} == {
        ("bbbc039", "train"): 90, ("bbbc039", "tune"): 10, ("bbbc039", "val"): 50}
    assert len({(e.dataset, e.stem) for e in todo}) == len(todo)  # no image in two splits
    assert all(len(e.image_sha256) == len(e.labels_sha256) == 64 for e in todo)


def test_cli_reports_missing_data_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", str(tmp_path / "out"), "--from", str(tmp_path / "empty"), "--dataset", "dsb2018_brightfield"]) == 2
    err = capsys.readouterr().err
    assert "graphkd data: error:" in err and err.count("\n") == 1
    assert main(["data", str(tmp_path / "out"), "--verify", "--dataset", "bbbc039"]) == 2
    assert "150 images missing or different" in capsys.readouterr().err


def test_real_data_rebuilds_to_the_manifest(tmp_path):
    """Dev suite: `graphkd data --from $GRAPHKD_DATA` rebuilds BBBC039 images exactly as recorded (tune + 5 val, 3 bright-field)."""
    root = env_data_root()
    if root is None or not (root / "bbbc039").is_dir():
        pytest.skip(f"set {datasets.DATA_ENV} to a folder holding bbbc039/ (e.g. one laid out by `graphkd data`)")
    todo = [e for e in entries(["bbbc039"]) if e.split == "tune"] + [e for e in entries(["bbbc039"]) if e.split == "val"][:5]
    sources = [root / "bbbc039"]
    if (root / "dsb2018_brightfield").is_dir():  # a dataset without split lists: flat layout
        todo += entries(["dsb2018_brightfield"])[:3]
        sources.append(root / "dsb2018_brightfield")
    report = build(tmp_path, index_sources(sources), todo)
    assert (report.written, report.missing, report.different) == (len(todo), [], [])
    assert verify(tmp_path, todo) == []


def test_a_tune_folder_beside_train_is_the_tune_split(tmp_path):
    from napari_graphkd.data import load_train_tune

    for split, stems in (("train", ["a", "b", "c"]), ("tune", ["t"])):
        for stem in stems:
            image, labels = _pair(len(stem), shape=(20, 24))  # load_folder needs 16 px per side
            for kind, array in (("images", image), ("labels", labels)):
                (tmp_path / split / kind).mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(tmp_path / split / kind / f"{stem}.tif", array)
    train, tune = load_train_tune(tmp_path / "train", n_tune=1)
    assert [s.name for s in train] == ["a", "b", "c"] and [s.name for s in tune] == ["t"]
    (tmp_path / "tune").rename(tmp_path / "elsewhere")  # no sibling: n_tune images of train/ are held out
    train, tune = load_train_tune(tmp_path / "train", n_tune=1)
    assert len(train) == 2 and len(tune) == 1 and tune[0].name in "abc"


def test_download_fetches_each_archive_once(tmp_path):
    source = tmp_path / "server" / "masks.zip"
    source.parent.mkdir()
    with zipfile.ZipFile(source, "w") as z:
        z.writestr("masks/x.png", b"png bytes")
    messages = []
    paths = datasets.download([source.as_uri()], tmp_path / "downloads", log=messages.append)
    assert paths == [tmp_path / "downloads" / "masks.zip"] and paths[0].read_bytes() == source.read_bytes()
    assert datasets.download([source.as_uri()], tmp_path / "downloads", log=messages.append) == paths
    assert len(messages) == 1  # the second call reuses the archive
    assert list(datasets.walk_members(tmp_path / "downloads"))[0][0] == ("masks", "masks", "x.png")


def test_cli_builds_then_verifies(tmp_path, monkeypatch, capsys):
    image, labels = _pair(5)
    for kind, array in (("images", image), ("labels", labels)):
        (tmp_path / "mine" / kind).mkdir(parents=True)
        tifffile.imwrite(tmp_path / "mine" / kind / "s5.tif", array)
    fake = [_entry("bbbc039", "val", "s5", image, labels)]
    monkeypatch.setattr(datasets, "entries", lambda names: fake)
    out = tmp_path / "DATA"
    assert main(["data", str(out), "--from", str(tmp_path / "mine")]) == 0
    assert "1 images written" in capsys.readouterr().out
    assert (out / "bbbc039" / "val" / "labels" / "s5.tif").exists()
    assert main(["data", str(out), "--verify"]) == 0
    assert main(["data", str(out), "--from", str(out / "bbbc039")]) == 2  # a source inside the output folder
    assert "must not lie inside" in capsys.readouterr().err
