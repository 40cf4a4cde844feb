"""Multi-source training data: split lists, balanced sampling, rescale to the training diameter, camera simulation."""
import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from napari_graphkd.data import (
    SPLIT_DIR, TRAIN_DIAMETER, AugmentConfig, Sample, augment, load_source, make_batch, median_diameter,
    parse_source, pick_samples, read_split, rescale_sample, simulate_acquisition,
)


def disks_image(diameter: float, shape=(200, 240), spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic nuclei: a grid of bright disks of ``diameter`` px (image in [0, 1], labels 1..N)."""
    labels = np.zeros(shape, np.int32)
    step = spacing or int(diameter * 2)
    n = 0
    for y in range(step // 2, shape[0] - step // 2, step):
        for x in range(step // 2, shape[1] - step // 2, step):
            n += 1
            labels[disk((y, x), diameter / 2, shape=shape)] = n
    return (labels > 0).astype(np.float32) * 0.8 + 0.1, labels


@pytest.mark.parametrize("diameter", [10.0, 19.0, 56.0])
def test_rescale_brings_nuclei_to_the_training_diameter(diameter):
    image, labels = disks_image(diameter, shape=(int(12 * diameter), int(12 * diameter)))
    out = rescale_sample(Sample("d", image, labels))
    assert abs(median_diameter([out]) - TRAIN_DIAMETER) < 1.5
    assert out.scale == pytest.approx(TRAIN_DIAMETER / median_diameter([Sample("d", image, labels)]), rel=1e-6)
    assert out.image.shape == out.labels.shape
    assert set(np.unique(out.labels)) == set(np.unique(labels))  # every nucleus survives, no invented ids
    assert out.image[out.labels > 0].mean() > 0.8 > out.image[out.labels == 0].mean()  # still aligned


def test_rescale_leaves_empty_images_alone_or_uses_the_fallback():
    empty = Sample("e", np.zeros((64, 64), np.float32), np.zeros((64, 64), np.int32))
    assert rescale_sample(empty) is empty
    assert rescale_sample(empty, fallback=14.0).image.shape == (128, 128)


def test_balanced_sampling_follows_source_weights_not_source_sizes():
    big = [Sample(f"b{i}", np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int32)) for i in range(90)]
    small = [Sample(f"s{i}", np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int32)) for i in range(3)]
    rng = np.random.default_rng(0)
    picks = pick_samples([big, small], None, 4000, rng)
    share = np.mean([p.name.startswith("s") for p in picks])
    assert abs(share - 0.5) < 0.03
    assert {p.name for p in picks if p.name.startswith("s")} == {"s0", "s1", "s2"}
    share = np.mean([p.name.startswith("s") for p in pick_samples([big, small], [3.0, 1.0], 4000, rng)])
    assert abs(share - 0.25) < 0.03


def test_camera_simulation_stays_finite_and_keeps_nuclei_brighter():
    image, labels = disks_image(20.0, shape=(120, 120))
    rng = np.random.default_rng(0)
    for _ in range(300):  # dim, bright, 8-bit, 16-bit, saturated: never a blank or inverted image
        out = simulate_acquisition(image, rng)
        assert out.shape == image.shape and out.dtype == np.float32 and np.isfinite(out).all()
        assert out[labels > 0].mean() > out[labels == 0].mean() + 2 * out[labels == 0].std()


def test_augmented_batches_keep_labels_aligned_with_camera_simulation():
    image, labels = disks_image(28.0, shape=(300, 300))
    cfg = AugmentConfig(crop=96, scale_range=(0.7, 1.4), acquisition_prob=1.0, noise_std=0.0, blur_prob=0.0)
    rng = np.random.default_rng(2)
    for _ in range(10):
        img, lab = augment(image, labels, cfg, rng)
        assert np.isfinite(img).all() and img.shape == lab.shape == (96, 96)
        if (lab > 0).any() and (lab == 0).any():
            assert img[lab > 0].mean() > img[lab == 0].mean()
    images, batch_labels = make_batch([[Sample("a", image, labels)], [Sample("b", image, labels)]], 3, cfg, rng)
    assert images.shape == (3, 1, 96, 96) and batch_labels.shape == (3, 96, 96)


@pytest.fixture()
def source_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i, d in enumerate([14.0, 20.0, 28.0, 40.0]):
        image, labels = disks_image(d, shape=(int(7 * d), int(7 * d)))
        tifffile.imwrite(tmp_path / "images" / f"im{i}.tif", (image * 200).astype(np.uint8))
        tifffile.imwrite(tmp_path / "labels" / f"im{i}.tif", labels.astype(np.uint16))
    (tmp_path / "mine_train.txt").write_text("im0\nim1\n# comment\nim3\n")
    (tmp_path / "mine_tune.txt").write_text("im2\n")
    return tmp_path


def test_sources_read_split_lists_and_rescale_every_image(source_folder):
    source = parse_source(f"{source_folder}@{source_folder / 'mine'}", weight=2.0)
    assert source.name == "mine" and source.train == ("im0", "im1", "im3") and source.tune == ("im2",) and source.weight == 2.0
    train, tune = load_source(source)
    assert [s.name for s in train] == ["im0", "im1", "im3"] and [s.name for s in tune] == ["im2"]
    assert all(abs(median_diameter([s]) - TRAIN_DIAMETER) < 1.5 for s in train + tune)
    plain = parse_source(str(source_folder), n_tune=1)
    assert plain.train is None and len(plain.tune) == 1


def test_source_errors_are_one_clear_line(source_folder):
    with pytest.raises(ValueError, match="no split list"):
        parse_source(f"{source_folder}@{source_folder / 'nosuch'}")
    (source_folder / "mine_tune.txt").write_text("absent\n")
    with pytest.raises(ValueError, match="not in"):
        parse_source(f"{source_folder}@{source_folder / 'mine'}")


def test_bundled_split_lists_are_disjoint_and_complete():
    for name, total in (("bbbc039", 150), ("dsb2018_fluo", 327)):
        parts = [set(read_split(SPLIT_DIR / f"{name}_{p}.txt")) for p in ("train", "tune", "val")]
        assert sum(map(len, parts)) == total == len(set.union(*parts))


def test_train_command_draws_from_several_sources_and_scores_each(source_folder, tmp_path, capsys):
    import json

    from napari_graphkd.cli import main
    from napari_graphkd.io.checkpoint import read_metadata

    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    (other / "labels").mkdir()
    for i in range(3):
        image, labels = disks_image(12.0 + 4 * i, shape=(120, 140))
        tifffile.imwrite(other / "images" / f"o{i}.tif", (image * 3000).astype(np.uint16))
        tifffile.imwrite(other / "labels" / f"o{i}.tif", labels.astype(np.uint16))
    run = tmp_path / "run"
    argv = ["train", "--data", f"{source_folder}@{source_folder / 'mine'}", "--data", str(other), "--n-tune", "1",
            "--arch", "halfres-student", "--steps", "2", "--batch-size", "2", "--crop", "64", "--validate-every", "2",
            "--threads", "1", "--out", str(run)]
    assert main(argv) == 0
    meta = read_metadata(run / "best.safetensors")
    sources = meta["training_data"]["sources"]
    assert [(s["name"], s["train_images"], len(s["tune_images"])) for s in sources] == [("mine", 3, 1), ("other", 2, 1)]
    assert meta["train_diameter"] == TRAIN_DIAMETER
    validation = json.loads((run / "progress.json").read_text())["validation"][-1]
    assert {"mine/f1@0.5", "other/aji", "score"} <= set(validation)
    assert main(argv[:-2] + ["--source-weights", "1", "--out", str(tmp_path / "r2")]) == 2
    assert "one positive weight per --data" in capsys.readouterr().err


def test_a_laid_out_set_with_train_and_tune_folders_is_a_source(source_folder, tmp_path):
    import shutil

    laid = tmp_path / "laid"
    for part, stems in (("train", ["im0", "im1", "im3"]), ("tune", ["im2"])):
        for kind in ("images", "labels"):
            (laid / part / kind).mkdir(parents=True)
            for stem in stems:
                shutil.copy(source_folder / kind / f"{stem}.tif", laid / part / kind)
    for spec in (f"{laid}@{source_folder / 'mine'}", f"{laid / 'train'}@{source_folder / 'mine'}", str(laid / "train")):
        train, tune = load_source(parse_source(spec))
        assert [s.name for s in train] == ["im0", "im1", "im3"] and [s.name for s in tune] == ["im2"], spec


def test_tune_sets_come_back_from_checkpoint_metadata(source_folder):
    from napari_graphkd.train.segmentation import tune_sets

    meta = {"training_data": {"sources": [{"name": "mine", "folder": str(source_folder), "tune_images": ["im2"]}]}}
    sets = tune_sets(meta)
    assert list(sets) == ["mine"] and [s.name for s in sets["mine"]] == ["im2"]
    assert abs(median_diameter(sets["mine"]) - TRAIN_DIAMETER) < 1.5
    with pytest.raises(ValueError, match="no training sources"):
        tune_sets({"training_data": {"folder": "x"}})


def test_tune_sets_find_each_source_under_a_data_folder(source_folder, tmp_path):
    import shutil

    from napari_graphkd.train.segmentation import tune_sets

    root = tmp_path / "DATA"
    for kind in ("images", "labels"):  # laid out as `graphkd data` does: NAME/tune
        (root / "mine" / "tune" / kind).mkdir(parents=True)
        shutil.copy(source_folder / kind / "im2.tif", root / "mine" / "tune" / kind)
    entry = {"name": "mine", "folder": "/elsewhere/mine", "tune_images": ["im2"]}
    sets = tune_sets({"training_data": {"sources": [entry]}}, data_root=root)
    assert [s.name for s in sets["mine"]] == ["im2"]
    with pytest.raises(ValueError, match="no folder under .* holds its 1 tune images"):
        tune_sets({"training_data": {"sources": [dict(entry, name="other")]}}, data_root=root)
