"""Distillation from several labelled sources and from images without labels (tiny crops, tiny teacher, few steps)."""
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage as ndi

from napari_graphkd.cli import main
from napari_graphkd.data import AugmentConfig, Sample, parse_source
from napari_graphkd.decode.policy import decode_output
from napari_graphkd.distill import method_weights
from napari_graphkd.inference import network_output
from napari_graphkd.io.checkpoint import read_metadata, save_checkpoint
from napari_graphkd.metrics import evaluate
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.segment import ModelSegmenter, bundled_path
from napari_graphkd.train.distill import (
    DistillSettings, compute_teacher_targets, distill_batches, distill_student, fit_crop, graph_labels, unlabelled_samples,
)
from napari_graphkd.train.loop import TrainSettings
from napari_graphkd.train.pseudo import decode_unlabelled, parse_unlabelled

TINY = TrainSettings(steps=3, batch_size=2, warmup=1, save_every=3, snapshot_every=10**9, validate_every=10**9,
                     augment=AugmentConfig(crop=64))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def folders(tmp_path, sample):
    """Two labelled folders (a, b) and one folder of images only (u), each of three real 96 x 128 crops."""
    image, labels = sample

    def write(name: str, origins, with_labels: bool = True) -> Path:
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        if with_labels:
            (root / "labels").mkdir()
        for i, (y, x) in enumerate(origins):
            tifffile.imwrite(root / "images" / f"{name}{i}.tif", image[y : y + 96, x : x + 128])
            if with_labels:
                tifffile.imwrite(root / "labels" / f"{name}{i}.tif", labels[y : y + 96, x : x + 128])
        return root

    return {"a": write("a", [(0, 0), (0, 150), (0, 300)]), "b": write("b", [(200, 0), (200, 150), (200, 300)]),
            "u": write("u", [(400, 0), (400, 150), (400, 300)], with_labels=False)}


@pytest.fixture()
def teacher_path(tmp_path):
    torch.manual_seed(1)
    return save_checkpoint(tmp_path / "teacher.safetensors", build_model(UNetConfig(widths=(8, 16, 16))), {"name": "t"})


def test_batches_draw_from_every_source_by_weight():
    """Two sources, balanced: both appear; a zero-weight source never does."""
    teacher = build_model(UNetConfig(widths=(4, 8))).eval()
    rng = np.random.default_rng(0)
    sources = [[Sample(f"{k}{i}", rng.random((64, 64), dtype=np.float32), np.zeros((64, 64), np.int32)) for i in range(n)]
               for k, n in (("a", 1), ("b", 5))]
    targets = compute_teacher_targets(teacher, sources[0] + sources[1], with_features=False)
    settings = TrainSettings(batch_size=4, augment=AugmentConfig(crop=64))
    drawn = [name for step in range(10) for name in distill_batches(sources, targets, settings)(np.random.default_rng(step)).image_ids]
    share_a = sum(n.startswith("a") for n in drawn) / len(drawn)
    assert 0.3 < share_a < 0.7  # the one-image source is drawn as often as the five-image one
    only_b = [n for step in range(5) for n in distill_batches(sources, targets, settings, [0.0, 1.0])(np.random.default_rng(step)).image_ids]
    assert all(n.startswith("b") for n in only_b)


def test_unlabelled_images_carry_the_teachers_instances_at_its_scale(tmp_path, sample):
    """An image shown at twice the size is segmented as a user's image would be: brought back to the model's
    scale, its nuclei are the teacher's instances there, stored as pseudo-instances (-1-k) or, for ``pseudo``, as labels."""
    image, labels = sample
    folder = tmp_path / "u"
    folder.mkdir()
    tifffile.imwrite(folder / "big.tif", ndi.zoom(image[:128, :160], 2.0, order=1))
    teacher = ModelSegmenter(bundled_path("teacher-bbbc039"))  # its size estimate of this BBBC039 crop is exact
    calls = []
    cache = tmp_path / "cache.safetensors"
    [[decoded]] = decode_unlabelled(teacher, [parse_unlabelled(str(folder))], cache, on_image=lambda i, n: calls.append(i))
    assert decoded.name == "u-unlabelled:big" and decoded.scale == pytest.approx(0.5)
    assert decoded.image.shape == decoded.labels.shape == (128, 160)
    expected = decode_output(network_output(teacher.model, decoded.image), teacher.decode_settings)[0]
    np.testing.assert_array_equal(decoded.labels, expected)
    assert evaluate(labels[:128, :160], decoded.labels)["f1@0.5"] > 0.7  # the nuclei of the native-size crop
    [[again]] = decode_unlabelled(teacher, [parse_unlabelled(str(folder))], cache, on_image=lambda i, n: calls.append(i))
    assert calls == [1]  # decoded once, then read from the cache
    np.testing.assert_array_equal(again.labels, decoded.labels)

    [[graph]] = unlabelled_samples([[decoded]], "grd")
    assert (graph.labels < 0).all()  # nothing annotated: the segmentation loss ignores every pixel
    np.testing.assert_array_equal(graph_labels(graph.labels), decoded.labels)  # graph nodes: the teacher's ids
    [[target]] = unlabelled_samples([[decoded]], "pseudo")
    np.testing.assert_array_equal(target.labels, decoded.labels)  # pseudo-label training: ordinary labels


@pytest.mark.parametrize("method", ["pseudo", "grd"])
def test_unlabelled_only_training_uses_the_decoded_labels_as_the_method_says(folders, teacher_path, tmp_path, method):
    """Sampling only the unlabelled source: pseudo-label training has segmentation losses and no KD terms;
    GRD has KD terms and no segmentation loss (the decoded instances are graph nodes only)."""
    seen = []
    source = parse_source(str(folders["a"]), n_tune=1, weight=0.0)  # labelled source never drawn
    distill = DistillSettings(method=method, weights=method_weights(method), memory_size=4, memory_samples=2)
    distill_student(teacher_path, [source], tmp_path / "run", "halfres-student", TINY, distill,
                    unlabelled=[parse_unlabelled(str(folders["u"]))], on_progress=seen.append)
    seg = [r["affinity"] + r.get("foreground", 0.0) for r in seen]
    kd = [sum(v for k, v in r.items() if k.startswith("kd_")) for r in seen]
    if method == "pseudo":
        assert min(seg) > 0 and max(kd, default=0.0) == 0
    else:
        assert max(seg) == 0 and min(kd) > 0
    meta = read_metadata(tmp_path / "run" / "last.safetensors")
    [entry] = meta["training_data"]["unlabelled"]
    assert entry["images"] == 3 and entry["used_as"] == ("labels" if method == "pseudo" else "graph nodes")


def test_multi_source_distillation_records_its_sources_and_validates_per_source(folders, teacher_path, tmp_path):
    sources = [parse_source(str(folders[k]), n_tune=1) for k in ("a", "b")]
    seen = []

    def factory(tune):
        assert set(tune) == {"a", "b"} and all(len(v) == 1 for v in tune.values())
        return lambda model: {"score": 0.0}

    settings = TrainSettings(**{**TINY.to_dict(), "validate_every": 3, "augment": AugmentConfig(crop=64)})
    distill_student(teacher_path, sources, tmp_path / "run", "halfres-student", settings, DistillSettings(memory_size=4, memory_samples=2),
                    validate_factory=factory, on_progress=seen.append)
    meta = read_metadata(tmp_path / "run" / "last.safetensors")
    assert [s["name"] for s in meta["training_data"]["sources"]] == ["a", "b"]
    assert [s["train_images"] for s in meta["training_data"]["sources"]] == [2, 2] and len(seen) == 3
    assert meta["validation"][-1]["step"] == 3


def test_cli_distils_from_two_sources_and_unlabelled_images(folders, teacher_path, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher_path), "--data", str(folders["a"]), "--data", str(folders["b"]),
            "--unlabelled", str(folders["u"]), "--out", str(run), "--steps", "2", "--crop", "64", "--batch-size", "2",
            "--n-tune", "1", "--validate-every", "2", "--memory-size", "2", "--memory-samples", "1", "--threads", "1"]
    assert main(args + ["--method", "pseudo"]) == 0
    out = capsys.readouterr()
    assert "finished at step 2" in out.out and "unlabelled u-unlabelled" in out.err
    meta = read_metadata(run / "last.safetensors")
    assert meta["distillation"]["method"] == "pseudo" and len(meta["training_data"]["sources"]) == 2
    assert meta["training_data"]["unlabelled"][0]["used_as"] == "labels"
    assert meta["command"].startswith("graphkd distill")
    no_images = ["distill", "--teacher", str(teacher_path), "--data", str(folders["a"]), "--out", str(tmp_path / "r2"),
                 "--method", "pseudo"]
    assert main(no_images) == 2
    assert "--unlabelled" in capsys.readouterr().err
    assert main(args[:-2] + ["--source-weights", "1", "1"]) == 2  # three sources, two weights
    assert "one weight per --data and --unlabelled (3)" in capsys.readouterr().err


def test_images_smaller_than_the_crop_are_padded_with_unannotated_pixels():
    """A small rescaled image still yields full crops: reflected image, labels -1 (ignored) in the padding."""
    image = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    labels = np.ones((40, 50), np.int32)
    padded = fit_crop(Sample("s", image, labels, 0.5), 64)
    assert padded.image.shape == padded.labels.shape == (64, 64) and padded.scale == 0.5
    np.testing.assert_array_equal(padded.image[:40, :50], image)
    np.testing.assert_array_equal(padded.image[40:42, :50], image[38:36:-1, :])  # reflected
    assert (padded.labels[40:] == -1).all() and (padded.labels[:, 50:] == -1).all() and (padded.labels[:40, :50] == 1).all()
    big = Sample("b", np.zeros((64, 80), np.float32), np.zeros((64, 80), np.int32))
    assert fit_crop(big, 64) is big
