"""Fine-tuning in memory on a shipped bright-field crop: the loss falls, runs save new files, cancel saves none."""
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_graphkd.io.checkpoint import read_metadata, save_checkpoint
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.train.finetune import (
    AnnotatedImage,
    FinetuneSettings,
    finetune_report,
    plan_finetune,
    run_finetune,
    save_new_checkpoint,
)
from napari_graphkd.train.finetune.report import no_better_warnings
from napari_graphkd.train.finetune.run import RETUNE_GRID, retune_cells, save_checkpoint_as

torch.set_num_threads(1)
CROPS = Path(__file__).parents[1] / "examples" / "data" / "brightfield" / "train"


@pytest.fixture(scope="module")
def brightfield():
    """One shipped 256x256 bright-field crop (dark nuclei) and its full annotation."""
    path = sorted((CROPS / "images").glob("*.tif"))[0]
    return tifffile.imread(path), tifffile.imread(CROPS / "labels" / path.name).astype(np.int32)


@pytest.fixture()
def models(tmp_path):
    """(teacher, student) tiny random checkpoints."""
    paths = []
    for seed, name in ((0, "t"), (1, "s")):
        torch.manual_seed(seed)
        paths.append(save_checkpoint(tmp_path / f"{name}.safetensors", build_model(UNetConfig(widths=(4, 8, 8), stem_stride=2)),
                                     {"name": name}))
    return paths


def test_finetuning_lowers_the_loss_and_saves_a_new_checkpoint(brightfield, models, tmp_path):
    teacher, student = models
    before = student.read_bytes()
    plan = plan_finetune([AnnotatedImage("bf", *brightfield)], FinetuneSettings(mode="finetune", steps=12, lr=3e-3, invert=True),
                         teacher, student)
    records = []
    result = run_finetune(plan, tmp_path / "models", on_progress=records.append)
    losses = [r["loss"] for r in records if r["phase"] == "training student"]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert result.saved["student"] == tmp_path / "models" / "student-finetuned.safetensors"
    assert student.read_bytes() == before
    meta = read_metadata(result.saved["student"])
    assert meta["input"]["invert"] is True and meta["finetune"]["mode"] == "finetune"
    assert meta["finetune"]["heldout_scores"] == result.scores["student"]
    assert set(result.scores["student"]) == {"before", "after"}
    assert meta["finetune"]["decode_tuned_on"] == "training cells"  # 3 held-out cells are too few to tune on
    assert all(meta["decode"][k] in values for k, values in RETUNE_GRID.items())
    report = finetune_report(result, plan)
    assert "decoder settings re-tuned on the training cells" in report
    assert "student before" in report and "student after" in report and "3 of 16 painted cells" in report


@pytest.mark.parametrize("mode", ["distil", "teacher"])
def test_other_modes_save_their_models(brightfield, models, tmp_path, mode):
    settings = FinetuneSettings(mode=mode, steps=2, teacher_steps=2, invert=True)
    plan = plan_finetune([AnnotatedImage("bf", *brightfield)], settings, *models)
    result = run_finetune(plan, tmp_path)
    names = {"distil": ["student-distilled"], "teacher": ["teacher-finetuned", "student-redistilled"]}[mode]
    assert [p.stem for p in result.saved.values()] == names
    assert list(result.scores) == [role for role in ("teacher", "student") if role in result.saved]
    if mode == "teacher":
        assert read_metadata(result.saved["student"])["finetune"]["teacher"]["path"] == str(result.saved["teacher"])


def test_stopping_saves_nothing(brightfield, models, tmp_path):
    plan = plan_finetune([AnnotatedImage("bf", *brightfield)], FinetuneSettings(mode="finetune", steps=50, invert=True), *models)
    records = []
    result = run_finetune(plan, tmp_path / "models", on_progress=records.append, should_stop=lambda: len(records) > 3)
    assert result.cancelled and result.saved == {} and not (tmp_path / "models").exists()
    assert set(result.scores["student"]) == {"before"}
    assert "nothing saved" in finetune_report(result, plan)


def test_new_checkpoints_never_overwrite(tmp_path):
    model = build_model(UNetConfig(widths=(4, 8), stem_stride=2))
    first = save_new_checkpoint(model, {"name": "a"}, tmp_path, "student-finetuned")
    data = first.read_bytes()
    second = save_new_checkpoint(model, {"name": "b"}, tmp_path, "student-finetuned")
    third = save_new_checkpoint(model, {"name": "c"}, tmp_path, "student-finetuned")
    assert [p.name for p in (first, second, third)] == [f"student-finetuned{s}.safetensors" for s in ("", "-2", "-3")]
    assert first.read_bytes() == data and read_metadata(third)["name"] == "c"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (first, second, third))  # no partial files


def test_decoder_is_retuned_on_heldout_cells_only_when_there_are_enough(brightfield, models):
    paths = sorted((CROPS / "images").glob("*.tif"))[:2]  # the second crop (13 cells) is held out entirely
    images = [AnnotatedImage(p.stem, tifffile.imread(p), tifffile.imread(CROPS / "labels" / p.name).astype(np.int32))
              for p in paths]
    settings = FinetuneSettings(steps=1, invert=True)
    where, samples = retune_cells(plan_finetune(images, settings, *models))
    labels = samples[0].labels
    assert where == "held-out cells" and len(samples) == 1 and len(np.unique(labels[labels > 0])) == 13
    assert {-1, 0} <= set(np.unique(labels).tolist())  # checked background (the margin) is known, the rest is not
    where, samples = retune_cells(plan_finetune([AnnotatedImage("bf", *brightfield)], settings, *models))
    labels = samples[0].labels
    assert where == "training cells" and len(np.unique(labels[labels > 0])) == 13
    assert labels.min() == -1 and (labels == 0).any()  # unannotated pixels stay unjudged, checked background counts


def test_report_warns_when_the_model_is_no_better():
    row = lambda r, a=0.4: {"recall@0.5": r, "mean_iou": 0.5, "aji": a}
    worse = no_better_warnings({"student": {"before": row(0.6), "after": row(0.55)}})
    assert len(worse) == 1 and "no better than before" in worse[0] and "0.600 -> 0.550" in worse[0]
    assert no_better_warnings({"student": {"before": row(0.6), "after": row(0.7)}}) == []
    assert no_better_warnings({"teacher": {"before": row(1.0, 0.68), "after": row(1.0, 0.89)}}) == []  # AJI up at full recall
    assert len(no_better_warnings({"teacher": {"before": row(1.0, 0.68), "after": row(1.0, 0.68)}})) == 1
    assert no_better_warnings({"student": {"before": row(0.6)}}) == []  # cancelled: nothing to compare


def test_saving_as_an_exact_name_refuses_an_existing_file(tmp_path):
    model = build_model(UNetConfig(widths=(4, 8), stem_stride=2))
    path = save_checkpoint_as(model, {"name": "a"}, tmp_path / "mine.safetensors")
    data = path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_checkpoint_as(model, {"name": "b"}, path)
    assert path.read_bytes() == data and [p.name for p in tmp_path.iterdir()] == ["mine.safetensors"]


def test_default_mode_trains_the_teacher_then_distils_the_student_on_every_image(brightfield, models, tmp_path):
    image, labels = (a[128:, :128] for a in brightfield)  # 10 cells
    first = np.unique(labels[labels > 0])[0]
    painted = np.where(labels == first, labels, 0)  # one painted cell: the teacher trains on the window around it
    images = [AnnotatedImage("painted", image, painted), AnnotatedImage("unpainted", image[::-1].copy(), np.zeros_like(labels)),
              AnnotatedImage("held", image[:, ::-1].copy(), labels[:, ::-1].copy())]
    settings = FinetuneSettings(steps=3, teacher_steps=2, crop=64, diameter=28.0, invert=True)
    plan = plan_finetune(images, settings, *models)
    assert plan.settings.mode == "teacher" and plan.crop == 64
    assert [s.name for s in plan.student_train] == ["0:painted", "1:unpainted"]  # the held-out image is never trained on
    assert plan.student_train[0].image.size > plan.train[0].image.size  # the student sees the whole image
    records = []
    result = run_finetune(plan, tmp_path, on_progress=records.append)
    steps = {phase: sum(r["phase"] == phase for r in records) for phase in ("training teacher", "training student")}
    assert steps == {"training teacher": 2, "training student": 3}
    assert [r["done"] for r in records if r["phase"] == "teacher pseudo-labels"] == [1, 2]
    assert read_metadata(result.saved["teacher"])["finetune"]["settings"]["teacher_steps"] == 2


def test_teacher_decoder_only_keeps_the_encoder_weights(brightfield, models):
    from napari_graphkd.io.checkpoint import load_checkpoint
    from napari_graphkd.train.finetune.run import _train_teacher

    settings = FinetuneSettings(teacher_steps=3, teacher_lr=1e-2, teacher_layers="decoder", crop=64, invert=True)
    plan = plan_finetune([AnnotatedImage("bf", *brightfield)], settings, *models)
    teacher = load_checkpoint(models[0])[0]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert _train_teacher(teacher, plan, lambda record: None, lambda: False)
    after = teacher.state_dict()
    weights = [k for k in before if k.endswith("weight") and before[k].ndim == 4]  # convolutions (BN statistics adapt)
    frozen = [k for k in weights if k.startswith(("stem", "down"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in weights if k.startswith("up"))


@pytest.mark.parametrize("bad", [{"teacher_steps": 0}, {"teacher_layers": "encoder"}, {"lr": 0.0}, {"crop": 32}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        FinetuneSettings(**bad)


def test_polarity_is_detected_on_the_images_unless_given(brightfield, models):
    """Without a stated polarity the plan inverts as `graphkd segment` will (dark nuclei: inverted; fluorescence: not),
    so a checkpoint fine-tuned on bright-field is given its input the way it learnt it; a stated value wins."""
    from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample

    image, labels = load_sample(SAMPLE_NAMES[0])
    fluo = AnnotatedImage("fluo", image[:256, :256], labels[:256, :256])
    for item, expected in ((AnnotatedImage("bf", *brightfield), True), (fluo, False)):
        assert plan_finetune([item], FinetuneSettings(steps=1), *models).invert is expected
        assert plan_finetune([item], FinetuneSettings(steps=1, invert=not expected), *models).invert is (not expected)
