"""The Fine-tune / distil widget under Xvfb: short runs, cancel, bad inputs, a responsive event loop."""
from __future__ import annotations

import time

import numpy as np
import pytest
from qtpy.QtCore import QTimer
from widget_utils import cancel_latency, checkpoints, errors, fresh_cache, notes, wait  # noqa: F401 - fixtures

from napari_graphkd._widgets import FinetuneWidget, SegmentWidget
from napari_graphkd._widgets._state import MODELS
from napari_graphkd.train.finetune import FinetuneSettings


def partial(labels: np.ndarray, keep: int = 10) -> np.ndarray:
    """A partial annotation: only the first ``keep`` cells of a ground truth are painted."""
    return np.where(np.isin(labels, np.unique(labels[labels > 0])[:keep]), labels, 0).astype(np.int32)


@pytest.fixture()
def setup(make_napari_viewer, crop, checkpoints, tmp_path):
    """Viewer with a real crop, a partial annotation, a docked Segment widget and the Fine-tune widget on tiny models."""
    viewer = make_napari_viewer()
    image, gt = crop
    viewer.add_image(image, name="crop")
    viewer.add_labels(partial(gt), name="my cells")
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="segment")
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="finetune")
    for w in (segment, widget):
        for role, path in zip(("teacher", "student"), checkpoints):
            w.pickers[role].source.value = "file"
            w.pickers[role].path.value = str(path)
    row = widget.rows[0]
    row.image.value, row.painted.value = viewer.layers["crop"], viewer.layers["my cells"]
    widget.folder.value = str(tmp_path / "models")
    widget.teacher_steps.value = 2  # short runs in mode teacher (the default)
    return viewer, widget, segment, checkpoints


def test_controls_start_at_the_library_defaults(setup):
    _, widget, _, _ = setup
    assert widget.mode.value == FinetuneSettings.mode == "teacher"
    assert widget.steps.value == FinetuneSettings.steps and FinetuneSettings.teacher_steps > 2
    assert widget.settings().teacher_steps == 2 and not widget.teacher_steps.native.isHidden()
    widget.mode.value = "finetune"  # the teacher's steps only matter in mode teacher
    assert widget.teacher_steps.native.isHidden()


def test_short_finetune_saves_a_new_model_and_shows_heldout_scores(setup, qtbot, notes):
    viewer, widget, segment, (teacher, student) = setup
    old = student.read_bytes()
    annotation = viewer.layers["my cells"].data.copy()
    widget.mode.value = "finetune"
    widget.steps.value = 3
    assert widget.start() is not None
    wait(qtbot, widget)
    assert errors(notes) == []
    new = widget.folder.value / "student-finetuned.safetensors"
    assert new.is_file() and student.read_bytes() == old
    assert [str(p) for p in widget.last_result.saved.values()] == [str(new)]
    assert widget.pickers["student"].path.value == new and segment.pickers["student"].path.value == new
    assert segment.pickers["teacher"].path.value == teacher  # the teacher was not trained
    assert MODELS.get(str(new))[1].path == new
    report = widget.report.value
    assert "2 of 10 painted cells of 'crop' held out" in report and "student before" in report and "student after" in report
    assert "caution: the before/after score rests on 2 held-out cells only" in report
    assert any("2 held-out cells" in message for message in errors(notes, "warning"))
    measured = float(report.split("nuclei of ")[1].split()[0])
    assert segment.diameter.value == pytest.approx(measured, abs=0.05) and measured > 0  # carried to Segment
    assert len(widget.curve.series["training student"]) == 3 and widget.progress.value == 100
    np.testing.assert_array_equal(viewer.layers["my cells"].data, annotation)  # user layers untouched
    assert [layer.name for layer in viewer.layers] == ["crop", "my cells"]
    widget.start()  # a second run never overwrites the first
    wait(qtbot, widget)
    assert (widget.folder.value / "student-finetuned-2.safetensors").is_file()


def test_cancel_keeps_the_weights(setup, qtbot, notes):
    viewer, widget, segment, (teacher, student) = setup
    old = student.read_bytes()
    cached = MODELS.get(str(student))[1].model
    weights = {k: v.clone() for k, v in cached.state_dict().items()}
    widget.mode.value = "finetune"
    widget.steps.value = 2000
    widget.start()
    qtbot.waitUntil(lambda: len(widget.curve.series.get("training student", [])) >= 2, timeout=60_000)
    latency = cancel_latency(qtbot, widget)
    print(f"\ncancel -> job finished in {latency:.2f} s")
    assert latency < 1.0
    assert any("cancelled" in message for _, message in notes)
    assert not widget.folder.value.exists() or not list(widget.folder.value.iterdir())
    assert student.read_bytes() == old
    assert MODELS.get(str(student))[1].model is cached
    assert all((cached.state_dict()[k] == v).all() for k, v in weights.items())
    assert segment.pickers["student"].path.value == student and widget.pickers["student"].path.value == student
    assert "nothing saved" in widget.report.value  # (with the before scores when the run stopped within the grace time)


def test_cancel_while_scoring_before_training_answers_within_a_second(setup, qtbot, monkeypatch, notes):
    viewer, widget, segment, (teacher, student) = setup
    import napari_graphkd.train.finetune.run as run

    original = run.heldout_scores
    monkeypatch.setattr(run, "heldout_scores", lambda *a: (time.sleep(2.0), original(*a))[1])  # a slow first phase
    widget.steps.value = 5
    widget.start()
    qtbot.wait(200)
    latency = cancel_latency(qtbot, widget)
    print(f"\ncancel while scoring -> job finished in {latency:.2f} s")
    assert latency < 1.0 and "nothing saved" in widget.report.value
    qtbot.wait(2500)  # the abandoned run stops at its next check and never saves
    assert not widget.folder.value.exists() or not list(widget.folder.value.iterdir())
    assert segment.pickers["student"].path.value == student


def test_event_loop_stays_responsive_while_training(setup, qtbot, notes):
    viewer, widget, _, _ = setup
    widget.steps.value = 40
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    widget.start()
    wait(qtbot, widget)
    timer.stop()
    gaps = np.diff(ticks)
    print(f"\nevent loop while fine-tuning: {len(ticks)} ticks of 20 ms, max gap {1000 * gaps.max():.0f} ms, "
          f"p95 {1000 * np.percentile(gaps, 95):.0f} ms")
    assert errors(notes) == [] and len(ticks) > 20
    assert gaps.max() < 1.5


def test_teacher_mode_with_two_images_and_checked_regions(setup, qtbot, crop, notes):
    viewer, widget, segment, (teacher, student) = setup
    image, gt = crop
    viewer.add_image(image[:, ::-1].copy(), name="second")
    viewer.add_labels(partial(gt[:, ::-1].copy(), keep=4), name="second cells")
    viewer.add_shapes([np.array([[0, 0], [0, 100], [80, 100], [80, 0]])], shape_type="rectangle", name="checked")
    widget.rows[0].regions.value = viewer.layers["checked"]
    widget.add_row.changed.emit(True)
    second = widget.rows[1]
    second.image.value, second.painted.value = viewer.layers["second"], viewer.layers["second cells"]
    widget.mode.value = "teacher"
    widget.steps.value = 2
    widget.start()
    wait(qtbot, widget)
    assert errors(notes) == []
    saved = widget.last_result.saved
    assert [p.name for p in saved.values()] == ["teacher-finetuned.safetensors", "student-redistilled.safetensors"]
    assert segment.pickers["teacher"].path.value == saved["teacher"] and segment.pickers["student"].path.value == saved["student"]
    assert "image 'second' held out entirely (4 painted cells)" in widget.report.value
    assert "teacher before" in widget.report.value and set(widget.curve.series) == {"training teacher", "training student"}
    assert teacher.is_file() and student.is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("no labels", "choose the Labels layer"),
        ("empty", "no painted cell"),
        ("wrong size", "has shape"),
        ("no shapes", "has no shapes"),
        ("shapes outside", "cover no pixel"),
        ("small", "too small"),
        ("one cell", "no painted cell is left"),
        ("twice", "chosen twice"),
        ("stack", "2D images"),
        ("moved", "is not placed like"),
        ("folder is a file", "not a folder"),
    ],
)
def test_bad_inputs_are_notified_and_nothing_starts(setup, qtbot, notes, case, message):
    viewer, widget, _, _ = setup
    row = widget.rows[0]
    image = viewer.layers["crop"].data
    if case == "no labels":
        viewer.layers.remove("my cells")
    elif case == "empty":
        row.painted.value = viewer.add_labels(np.zeros(image.shape, np.int32), name="empty")
    elif case == "wrong size":
        row.painted.value = viewer.add_labels(partial(np.pad(viewer.layers["my cells"].data, 4)), name="big")
    elif case == "no shapes":
        row.regions.value = viewer.add_shapes(name="nothing drawn", ndim=2)
    elif case == "shapes outside":
        row.regions.value = viewer.add_shapes([np.array([[500, 500], [500, 600], [600, 600], [600, 500]])], name="far")
    elif case == "small":
        row.image.value = viewer.add_image(image[:40, :40].copy(), name="tiny")
        row.painted.value = viewer.add_labels(viewer.layers["my cells"].data[:40, :40].copy(), name="tiny cells")
        widget.diameter.value = 28.0
    elif case == "one cell":
        row.painted.value = viewer.add_labels(partial(viewer.layers["my cells"].data, keep=1), name="one")
    elif case == "twice":
        widget.add_row.changed.emit(True)
        widget.rows[1].image.value, widget.rows[1].painted.value = viewer.layers["crop"], viewer.layers["my cells"]
    elif case == "stack":
        row.image.value = viewer.add_image(np.stack([image, image]), name="stack")
    elif case == "moved":
        viewer.layers["my cells"].translate = (10, 0)
    elif case == "folder is a file":
        widget.folder.value.parent.mkdir(parents=True, exist_ok=True)
        widget.folder.value.write_text("not a folder")
    assert widget.start() is None
    assert not widget.busy
    assert message in errors(notes)[-1]
    assert not widget.folder.value.is_dir()


def test_opened_from_the_plugin_menu(make_napari_viewer, qtbot, crop, checkpoints, tmp_path, notes):
    viewer = make_napari_viewer()
    _, segment = viewer.window.add_plugin_dock_widget("napari-graphkd", "Segment (teacher vs student)")
    _, widget = viewer.window.add_plugin_dock_widget("napari-graphkd", "Fine-tune / distil")
    assert isinstance(widget, FinetuneWidget)
    viewer.add_image(crop[0], name="crop")  # napari hands plugins a proxy of the viewer: all must still work
    viewer.add_labels(partial(crop[1]), name="cells")
    assert widget.rows[0].image.value is viewer.layers["crop"] and widget.rows[0].painted.value is viewer.layers["cells"]
    for role, path in zip(("teacher", "student"), checkpoints):
        widget.pickers[role].source.value = "file"
        widget.pickers[role].path.value = str(path)
    widget.folder.value = str(tmp_path)
    widget.steps.value = 2
    widget.mode.value = "distil"
    widget.start()
    wait(qtbot, widget)
    assert errors(notes) == []
    assert segment.pickers["student"].path.value == tmp_path / "student-distilled.safetensors"


def test_annotation_defaults_to_the_users_layer_and_asks_before_training_on_model_output(
        make_napari_viewer, qtbot, crop, checkpoints, tmp_path, notes):
    from napari_graphkd._widgets._layers import KEY

    viewer = make_napari_viewer()
    image, gt = crop
    viewer.add_image(image, name="crop")
    viewer.add_labels(gt, name="crop ground truth")
    result = viewer.add_labels(gt.copy(), name="crop student 28px",
                               metadata={KEY: {"created_by": "napari-graphkd Segment widget", "model": "student"}})
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    for role, path in zip(("teacher", "student"), checkpoints):
        widget.pickers[role].source.value = "file"
        widget.pickers[role].path.value = str(path)
    widget.folder.value = str(tmp_path / "models")
    widget.steps.value = widget.teacher_steps.value = 1
    row = widget.rows[0]
    assert row.painted.value is not result and row.painted.value.name == "crop ground truth"
    assert not widget.confirm.native.isHidden()  # both candidates are suspects: ask first
    assert widget.start() is None and not widget.busy
    assert "looks like ground truth" in errors(notes, "warning")[-1] and "Train on it anyway" in errors(notes, "warning")[-1]
    row.painted.value = result
    assert widget.start() is None
    assert "is a result of the student model" in errors(notes, "warning")[-1]
    mine = viewer.add_labels(partial(gt), name="Labels")  # the user makes a layer and paints: it becomes the default
    assert row.painted.value is mine and widget.confirm.native.isHidden()
    row.painted.value = result
    widget.confirm.value = True  # the user insists
    assert widget.start() is not None
    wait(qtbot, widget)
    assert errors(notes) == [] and widget.last_result.saved
    assert "every nucleus" in widget.help.value and "Shapes" in widget.help.value  # checked regions explained
