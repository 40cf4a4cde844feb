"""Distillation training end to end on tiny real crops: cached teacher, aligned crops, resumable."""
import numpy as np
import pytest
import torch

from napari_graphkd.data import AugmentConfig, Sample
from napari_graphkd.distill import method_weights
from napari_graphkd.io.checkpoint import read_metadata, save_checkpoint
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.train.distill import (
    DistillSettings, compute_teacher_targets, distill_batches, distill_student, load_teacher_targets, save_teacher_targets,
)
from napari_graphkd.train.loop import TrainSettings


@pytest.fixture()
def folder(crop_folder):
    return crop_folder(128, 160)


@pytest.fixture()
def teacher_path(tmp_path):
    torch.manual_seed(1)
    return save_checkpoint(tmp_path / "teacher.safetensors", build_model(UNetConfig(widths=(8, 16, 16))), {"name": "t"})


def test_cached_teacher_crops_match_running_the_teacher_on_the_crop(sample):
    """Cropping + rotating the cached output equals the teacher's output on the crop, away from borders."""
    torch.manual_seed(0)
    teacher = build_model(UNetConfig(widths=(4, 8))).eval()
    image = (sample[0][:96, :128] / 4095.0).astype(np.float32)
    targets = compute_teacher_targets(teacher, [Sample("s", image, sample[1][:96, :128])], with_features=True)
    settings = TrainSettings(batch_size=1, augment=AugmentConfig(crop=64, noise_std=0, renormalize_prob=0,
                                                                 gamma_range=(1, 1), gain_range=(1, 1), offset_range=(0, 0), blur_prob=0))
    batch = distill_batches([Sample("s", image, sample[1][:96, :128])], targets, settings)(np.random.default_rng(3))
    with torch.no_grad():
        direct, _, _ = teacher.forward_padded(batch.images)
    inner = (slice(None), slice(None), slice(12, -12), slice(12, -12))
    torch.testing.assert_close(batch.teacher.embedding[inner], direct[inner], atol=2e-2, rtol=0)
    assert [f.shape[-1] for f in batch.teacher.features] == [32, 64]


@pytest.mark.parametrize("method", ["grd", "cwd"])
def test_distillation_runs_resumes_and_records_its_settings(folder, teacher_path, tmp_path, method):
    settings = TrainSettings(steps=4, batch_size=2, warmup=1, save_every=2, snapshot_every=2, validate_every=2,
                             augment=AugmentConfig(crop=64))
    distill = DistillSettings(method=method, weights=method_weights(method), memory_size=4, memory_samples=2)
    seen = []
    progress = distill_student(teacher_path, folder, tmp_path / "run", "halfres-student", settings, distill,
                               n_tune=1, on_progress=seen.append)
    assert progress["step"] == 4
    kd_parts = {k for record in seen for k in record if k.startswith("kd_")}
    if method == "grd":
        assert {"kd_affinity", "kd_node", "kd_edge", "kd_inter_affinity", "kd_inter_edge"} <= kd_parts
    else:
        assert kd_parts == {"kd_cwd"}
        from safetensors import safe_open

        with safe_open(str(tmp_path / "run" / "state.safetensors"), framework="pt") as f:
            assert any(k.startswith("extra0.") for k in f.keys())  # the learned adapter is resumable
    meta = read_metadata(tmp_path / "run" / "last.safetensors")
    assert meta["distillation"]["method"] == method and meta["teacher"]["sha256_16"]
    settings.steps = 6
    resumed = distill_student(teacher_path, folder, tmp_path / "run", "halfres-student", settings, distill, n_tune=1)
    assert resumed["step"] == 6 and len(resumed["history"]) == 6


def test_teacher_targets_on_disk_round_trip_and_refuse_other_images(sample, tmp_path):
    """Benchmark rows share the teacher's outputs through a file; a file made for other images is not used."""
    teacher = build_model(UNetConfig(widths=(4, 8))).eval()
    image = (sample[0][:64, :80] / 4095.0).astype(np.float32)
    samples = [Sample("a", image, sample[1][:64, :80]), Sample("b", image[::-1].copy(), sample[1][:64, :80])]
    targets = compute_teacher_targets(teacher, samples, with_features=True)
    path = tmp_path / "targets.safetensors"
    save_teacher_targets(targets, ["a", "b"], path)
    loaded = load_teacher_targets(path, ["a", "b"], with_features=True)
    for want, got in zip(targets, loaded):
        torch.testing.assert_close(got.embedding, want.embedding, rtol=0, atol=0)
        assert len(got.features) == len(want.features) > 0
        for f_want, f_got in zip(want.features, got.features):
            torch.testing.assert_close(f_got, f_want, rtol=0, atol=0)
    assert load_teacher_targets(path, ["a", "b"], with_features=False)[1].features == []
    assert load_teacher_targets(path, ["a", "c"], with_features=False) is None
    assert load_teacher_targets(tmp_path / "missing.safetensors", ["a", "b"], with_features=False) is None


def test_distillation_continues_a_trained_student_and_refuses_one_of_other_dimensions(folder, teacher_path, tmp_path):
    """``init_checkpoint``: the student starts from the given weights (recorded), of the teacher's dimensionality."""
    torch.manual_seed(5)
    start = build_model("halfres-student")
    init = save_checkpoint(tmp_path / "student.safetensors", start, {"name": "s"})
    settings = TrainSettings(steps=1, batch_size=1, lr=0.0, warmup=1, augment=AugmentConfig(crop=64))
    distill = DistillSettings(method="grd", weights=method_weights("grd"), memory_size=2, memory_samples=1)
    distill_student(teacher_path, folder, tmp_path / "run", "halfres-student", settings, distill, n_tune=1,
                    init_checkpoint=init)
    meta = read_metadata(tmp_path / "run" / "last.safetensors")
    assert meta["init_checkpoint"] == str(init) and meta["name"] == "student, continued, distilled (grd)"
    from napari_graphkd.io.checkpoint import load_checkpoint

    continued, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")
    first = next(iter(start.state_dict()))  # lr 0: one step leaves the initial weights (up to fp rounding)
    torch.testing.assert_close(continued.state_dict()[first], start.state_dict()[first], atol=1e-3, rtol=0)
    other = save_checkpoint(tmp_path / "other.safetensors", build_model("unet3d-student"), {"name": "o"})
    with pytest.raises(ValueError, match="is a 3D network and the teacher is 2D"):
        distill_student(teacher_path, folder, tmp_path / "run2", "halfres-student", settings, distill, n_tune=1,
                        init_checkpoint=other)
