"""Training state is one unit: a kill at any moment resumes to exactly the uninterrupted run, or is refused."""
import json

import numpy as np
import pytest
import torch

from napari_graphkd.io import checkpoint as ckpt
from napari_graphkd.io.checkpoint import read_metadata, save_checkpoint
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.train.loop import TrainSettings, run_training, segmentation_loss
from napari_graphkd.train.state import ResumeError

STEPS = 8


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs."""


def blobs(rng):
    """Synthetic batch: noisy images with two bright squares each, and their labels."""
    images = 0.1 * rng.random((2, 1, 32, 32), dtype=np.float32)
    labels = np.zeros((2, 32, 32), dtype=np.int32)
    for b in range(2):
        for i, (y, x) in enumerate(rng.integers(0, 22, size=(2, 2)), start=1):
            labels[b, y : y + 10, x : x + 10] = i
            images[b, 0, y : y + 10, x : x + 10] += 0.8
    return images, labels


def step_loss(net, batch):
    images, labels = batch
    emb, fg = net(torch.from_numpy(images))
    return segmentation_loss(emb, fg, labels, 1.0)


def validate(model):
    """A score of the model's state (the same however the run was split): new bests at steps 2 and 4 of 8."""
    return {"score": float(model.stem[1].num_batches_tracked % 5)}


def train(run_dir, stop_after=None):
    torch.manual_seed(0)
    model = build_model(UNetConfig(widths=(4, 8), stem_stride=2))
    settings = TrainSettings(steps=STEPS, batch_size=2, lr=3e-3, warmup=2, save_every=2, snapshot_every=4,
                             validate_every=2)
    done = []
    progress = run_training(model, blobs, run_dir, settings, step_loss=step_loss, metadata={}, validate=validate,
                            on_progress=done.append, should_stop=lambda: stop_after is not None and len(done) >= stop_after)
    return model, progress


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread (and the test shares the machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(one_thread, tmp_path_factory):
    """The uninterrupted run."""
    return train(tmp_path_factory.mktemp("straight"))


def assert_same_run(model, progress, reference):
    ref_model, ref_progress = reference
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # weights and BatchNorm statistics/counters
    assert [h["loss"] for h in progress["history"]] == [h["loss"] for h in ref_progress["history"]]
    assert progress["best"] == ref_progress["best"]


def assert_files_agree(run_dir, progress):
    assert json.loads((run_dir / "progress.json").read_text())["step"] == progress["step"]
    assert read_metadata(run_dir / "last.safetensors")["step"] == progress["step"]
    assert read_metadata(run_dir / "best.safetensors")["step"] == progress["best"]["step"]


def test_half_then_resume_equals_the_straight_run(straight, tmp_path):
    train(tmp_path, stop_after=STEPS // 2 + 1)  # stops between two saves
    model, progress = train(tmp_path)
    assert_same_run(model, progress, straight)
    assert_files_agree(tmp_path, progress)
    assert model.stem[1].num_batches_tracked.item() == STEPS


@pytest.mark.parametrize("kill_at", [1, 2, 4, 5, 7, 9, 13, 15])
def test_a_kill_between_any_two_writes_resumes_exactly(straight, tmp_path, monkeypatch, kill_at):
    real_commit, calls = ckpt._commit, []

    def commit(tmp, path):
        calls.append(path.name)
        if len(calls) == kill_at:
            raise Killed
        real_commit(tmp, path)

    monkeypatch.setattr(ckpt, "_commit", commit)
    with pytest.raises(Killed):
        train(tmp_path)
    monkeypatch.setattr(ckpt, "_commit", real_commit)
    model, progress = train(tmp_path)
    assert_same_run(model, progress, straight)
    assert_files_agree(tmp_path, progress)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000004.safetensors", "step_000008.safetensors"]


def test_stale_temp_files_are_removed_on_start(tmp_path):
    for name in (".last.safetensors.k2j3l.tmp", ".state.safetensors.x1y2.tmp", ".progress.json.abc123", ".keep", "notes.txt"):
        (tmp_path / name).write_bytes(b"x" * 10)
    train(tmp_path, stop_after=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".txt") == [".keep", "notes.txt"]


def test_an_inconsistent_folder_of_the_older_layout_is_refused(tmp_path):
    model = build_model(UNetConfig(widths=(4, 8), stem_stride=2))
    save_checkpoint(tmp_path / "last.safetensors", model, {"step": 6})
    (tmp_path / "progress.json").write_text(json.dumps({"step": 3, "history": [], "validation": [], "best": None}))
    with pytest.raises(ResumeError, match="step 6 but progress.json at step 3"):
        train(tmp_path)


def test_a_run_of_another_network_is_refused(tmp_path):
    train(tmp_path, stop_after=2)
    torch.manual_seed(0)
    other = build_model(UNetConfig(widths=(4, 16), stem_stride=2))
    with pytest.raises(ResumeError, match="different network"):
        run_training(other, blobs, tmp_path, TrainSettings(steps=4, batch_size=2), step_loss=step_loss, metadata={})


def distil(run_dir, samples, stop_after=None):
    """A tiny GRD distillation (memory bank on) of 6 steps, optionally stopped early."""
    from napari_graphkd.data import AugmentConfig
    from napari_graphkd.distill import method_weights
    from napari_graphkd.train.distill import DistillSettings, distill_samples

    torch.manual_seed(1)
    teacher = build_model(UNetConfig(widths=(4, 8))).eval()
    student = build_model(UNetConfig(widths=(4, 8), stem_stride=2))
    settings = TrainSettings(steps=6, batch_size=2, warmup=1, save_every=2, snapshot_every=100, validate_every=100,
                             augment=AugmentConfig(crop=64))
    distill = DistillSettings(method="grd", weights=method_weights("grd"), memory_size=3, memory_samples=2)
    done = []
    progress = distill_samples(teacher, student, samples, run_dir, settings, distill, metadata={}, on_progress=done.append,
                               should_stop=lambda: stop_after is not None and len(done) >= stop_after)
    return student, progress


def test_distillation_resumes_exactly_with_its_memory_bank(sample, tmp_path):
    from napari_graphkd.data import Sample

    image = (sample[0] / 4095.0).astype(np.float32)
    samples = [Sample(f"s{i}", image[y : y + 96, x : x + 128], sample[1][y : y + 96, x : x + 128])
               for i, (y, x) in enumerate([(0, 0), (200, 300), (400, 500)])]
    straight = distil(tmp_path / "straight", samples)
    distil(tmp_path / "split", samples, stop_after=3)
    model, progress = distil(tmp_path / "split", samples)
    assert any("kd_inter_edge" in h for h in progress["history"][3:])  # the memory bank was in use after the resume
    assert_same_run(model, progress, straight)
