"""Fine-tuning 3D models on painted (Z,Y,X) volumes: the library round trip, the plan's maps and crops, refusals, the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from volume_utils import blob_volume, volume_checkpoint

from napari_graphkd.cli import main
from napari_graphkd.data import Sample
from napari_graphkd.decode.mws import DecodeSettings
from napari_graphkd.io.checkpoint import load_checkpoint, read_metadata
from napari_graphkd.preprocess import InputError
from napari_graphkd.train.finetune import (AnnotatedImage, FinetuneSettings, annotation_map, finetune_report, plan_finetune,
                                           run_finetune)
from napari_graphkd.train.finetune import run
from napari_graphkd.train.finetune.run import RETUNE_GRID_3D

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (16, 48, 48)
VOXEL = (2.0, 1.0, 1.0)


@pytest.fixture()
def models3d(tmp_path):
    """(teacher, student) tiny random 3D checkpoints trained, they say, at voxel 2:1:1 (z:y:x)."""
    return volume_checkpoint(tmp_path / "t3d.safetensors", VOXEL), volume_checkpoint(tmp_path / "s3d.safetensors", VOXEL)


@pytest.fixture(scope="module")
def painted():
    """A 16x48x48 volume of three bright ellipsoids and their painted labels."""
    return blob_volume(SHAPE)


def test_teacher_then_student_on_a_painted_volume_saves_3d_checkpoints(painted, models3d, tmp_path):
    teacher, student = models3d
    before = {p: p.read_bytes() for p in models3d}
    settings = FinetuneSettings(steps=2, teacher_steps=2, batch_size=1, volume_crop=(8, 32, 32))
    plan = plan_finetune([AnnotatedImage("vol", *painted)], settings, *models3d)
    assert plan.ndim == 3 and plan.crop == (8, 32, 32) and plan.scale == (1.0, 1.0, 1.0) and plan.diameter is None
    records = []
    result = run_finetune(plan, tmp_path / "models", on_progress=records.append)
    assert [p.name for p in result.saved.values()] == ["teacher-finetuned.safetensors", "student-redistilled.safetensors"]
    assert all(p.read_bytes() == data for p, data in before.items())  # the user's checkpoints are untouched
    losses = [r["loss"] for r in records if r["loss"] is not None]
    assert len(losses) == 4 and np.isfinite(losses).all()  # two teacher steps, two student steps, in float32
    for role, path in result.saved.items():
        meta, base = read_metadata(path), read_metadata(teacher)
        assert meta["config"]["ndim"] == 3 and meta["voxel_size"] == list(VOXEL) and meta["offsets"] == base["offsets"]
        assert all(meta["decode"][k] in values for k, values in RETUNE_GRID_3D.items())  # re-tuned in voxels, saved
        assert set(meta["finetune"]["heldout_scores"]) == {"before", "after"} == set(result.scores[role])
        assert meta["finetune"]["settings"]["volume_crop"] == [8, 32, 32] and meta["finetune"]["scale"] == [1.0, 1.0, 1.0]
    assert read_metadata(result.saved["student"])["finetune"]["teacher"]["path"] == str(result.saved["teacher"])
    report = finetune_report(result, plan)
    assert "1 of 3 painted cells of 'vol' held out" in report and "student after" in report
    assert "training crops 8x32x32 voxels" in report


def test_partly_painted_volume_teaches_only_near_its_cells(painted, models3d):
    volume, labels = painted
    partial = np.where(labels == 2, 0, labels)  # one ellipsoid left unpainted: unknown, never background
    settings = FinetuneSettings(mode="finetune", margin=2, voxel_size=VOXEL)
    plan = plan_finetune([AnnotatedImage("vol", volume, partial)], settings, *models3d)
    train = plan.train[0].labels
    assert plan.crop == SHAPE  # the default 16x64x64 crop, clipped to the volume
    assert plan.voxel_size == VOXEL and plan.train_cells == 1 and plan.painted_cells == 2
    assert train.ndim == 3 and min(a >= b for a, b in zip(train.shape, plan.crop))  # the window around the painted voxels
    held = int(np.unique(plan.heldout.cells[plan.heldout.cells > 0])[0])
    kept = ({1, 3} - {held}).pop()
    assert set(np.unique(train).tolist()) == {-1, 0, kept}  # unpainted voxels beyond the margin are unknown (-1)
    assert plan.heldout.annotation.shape == SHAPE and (plan.heldout.annotation == held).sum() == (labels == held).sum()
    distil = plan_finetune([AnnotatedImage("vol", volume, partial)], FinetuneSettings(mode="distil"), *models3d)
    assert distil.train[0].labels.shape == SHAPE and (distil.train[0].labels == -1).all()  # whole volume, teacher only
    assert not plan.invert and plan_finetune([AnnotatedImage("dark", 255 - volume, partial)], settings, *models3d).invert


def test_the_margin_of_a_volume_is_measured_with_its_voxel_size():
    labels = np.zeros((7, 9, 9), np.int32)
    labels[3, 4, 4] = 5
    out = annotation_map(labels, margin=2, sampling=(2.0, 1.0, 1.0))  # a z step is 2 px
    assert out[3, 4, 4] == 5 and out[3, 4, 6] == 0 and out[3, 4, 7] == -1  # 2 px away in x: background; 3: unknown
    assert out[4, 4, 4] == 0 and out[5, 4, 4] == -1 and out[4, 4, 5] == -1  # 2 px away in z; 4; sqrt(5) > 2
    assert (out == 0).sum() == 12 + 2  # the 12 pixels of the y-x disc of radius 2 around it, and one voxel above and below


@pytest.mark.parametrize("case, message", [
    ("2d models", "the models are 2D: the painted (Z,Y,X) labels"),
    ("2d image", "the models are 3D: they fine-tune on (Z,Y,X) volumes"),
    ("mixed", "the teacher is a 3D model and the student a 2D one"),
    ("voxel", "different voxel proportions (2:1:1 vs 1:1:1 z:y:x)"),
    ("small", "becomes 4x12x12 at the models' scale"),
    ("scale augment", "scale augmentation applies to 2D images"),
])
def test_mismatched_dimensions_are_refused_in_one_line(painted, models3d, tiny_checkpoint, tmp_path, case, message):
    volume, labels = painted
    teacher, student = models3d
    item, settings = AnnotatedImage("vol", volume, labels), FinetuneSettings()
    if case == "2d models":
        teacher = student = tiny_checkpoint
    elif case == "2d image":
        item = AnnotatedImage("plane", volume[8], labels[8])
    elif case == "mixed":
        student = tiny_checkpoint
    elif case == "voxel":
        student = volume_checkpoint(tmp_path / "iso.safetensors", (1.0, 1.0, 1.0))
    elif case == "small":
        settings = FinetuneSettings(diameter=112.0)  # shrunk 4x to the models' 28 px training diameter
    else:
        settings = FinetuneSettings(scale_augment=True)
    with pytest.raises(InputError, match="^[^\n]*$") as info:
        plan_finetune([item], settings, teacher, student)
    assert message in str(info.value)


def test_finetune_command_on_a_folder_of_volumes(models3d, tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "painted"
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True)
    for name, seed in (("a.tif", 0), ("b.tif", 1)):  # b, the last by name, is held out entirely
        volume, labels = blob_volume(SHAPE, seed)
        tifffile.imwrite(folder / "images" / name, volume)
        tifffile.imwrite(folder / "labels" / name, labels)
    teacher, student = (str(p) for p in models3d)
    out = tmp_path / "mine.safetensors"
    args = ["finetune", str(folder), "--model", student, "--teacher", teacher, "--mode", "finetune", "--steps", "2",
            "--voxel-size", "2,1,1", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "held out entirely" in captured.out and "volumes at voxel 2:1:1 (z:y:x)" in captured.out
    assert f"saved student: {out}" in captured.out and "training student: 2/2" in captured.err
    meta = read_metadata(out)
    assert meta["config"]["ndim"] == 3 and meta["finetune"]["voxel_size"] == [2.0, 1.0, 1.0]
    assert meta["finetune"]["decode_tuned_on"] == "training cells"  # three held-out cells are too few to tune on
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # never overwritten
    two_d = str(tiny_checkpoint)
    assert main(["finetune", str(folder), "--model", two_d, "--teacher", two_d, "--out", str(tmp_path / "2d.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "graphkd finetune: error: the models are 2D: the painted (Z,Y,X) labels of 'a.tif' need 3D models" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "2d.safetensors").exists()


def test_volume_decoder_is_retuned_one_setting_at_a_time(painted, models3d, monkeypatch):
    model, meta = load_checkpoint(models3d[0])
    volume, labels = painted
    target = {"foreground_threshold": 0.6, "min_size": 1000, "attractive_bias": 0.15}
    seen = []

    def score(outputs, samples, settings):  # a stand-in for decoding: closer to ``target`` scores higher
        seen.append(settings)
        assert outputs[0].embedding.shape[1:] == SHAPE and outputs[0].offsets is not None  # a 3D output, the model's offsets
        return {"score": -sum(abs(getattr(settings, k) - v) for k, v in target.items())}

    monkeypatch.setattr(run, "painted_cell_scores", score)
    sample = Sample("vol", volume.astype(np.float32) / 255, labels)
    best = run.retune_decoder(model, meta, [sample], tuple(tuple(o) for o in meta["offsets"]))
    assert {k: getattr(best, k) for k in target} == target
    assert len(seen) == 9  # three values of each of three settings, in turn, instead of 27 combinations
    assert [s.min_size for s in seen[:3]] == [DecodeSettings().min_size] * 3  # the threshold first, from the model's decoder
    assert all(s.foreground_threshold == 0.6 for s in seen[3:])  # later settings start from the earlier choices
