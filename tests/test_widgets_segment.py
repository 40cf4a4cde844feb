"""The Segment widget end to end under Xvfb, on a small real BBBC039 crop with tiny random networks."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from widget_utils import (  # noqa: F401 - fixtures
    cancel_latency,
    checkpoints,
    errors,
    fresh_cache,
    labels_layers,
    network_calls,
    notes,
    small_stack,
    use_files,
    wait,
)

from qtpy.QtWidgets import QScrollArea

from napari_graphkd._widgets import SegmentWidget
from napari_graphkd._widgets._layers import KEY


@pytest.fixture()
def setup(make_napari_viewer, crop, checkpoints):
    """Viewer with the crop and its ground truth, and a docked Segment widget using tiny checkpoints.

    The input rules are fixed (the tiny models' training diameter, no inversion, luminance): one
    network run per model and plane. The plugin-menu test below runs the default automatic rules.
    """
    viewer = make_napari_viewer()
    image, gt = crop
    viewer.add_image(image, name="crop")
    viewer.add_labels(gt, name="crop gt")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    use_files(widget, *checkpoints)
    widget.image.value = viewer.layers["crop"]
    widget.diameter.value, widget.invert.value, widget.channel.value = 28.0, False, "luminance"
    return viewer, widget


def test_pickers_show_architecture_and_parameters(setup):
    _, widget = setup
    info = widget.pickers["teacher"].info.value
    assert "EmbeddingUNet" in info and "half-resolution" in info and "parameters" in info
    assert "nuclei 28 px" in info  # what the model was trained on
    widget.pickers["student"].source.value = "student"
    assert "trained on BBBC039 fluorescence" in widget.pickers["student"].info.value


def test_diameter_zero_reads_auto_and_means_the_automatic_estimate(setup):
    _, widget = setup
    widget.diameter.value = 0.0
    assert widget.diameter.native.text() == "auto"
    assert widget.run_settings().diameter == "auto"
    widget.diameter.value = 31.0
    assert widget.diameter.native.text() != "auto" and widget.run_settings().diameter == 31.0


def test_run_both_creates_new_layers_with_provenance_and_scores(setup, qtbot, network_calls, notes):
    viewer, widget = setup
    gt_before = viewer.layers["crop gt"].data.copy()
    widget.ground_truth.value = viewer.layers["crop gt"]
    worker = widget.run(("teacher", "student"))
    assert worker is not None
    wait(qtbot, widget)
    assert errors(notes) == []
    names = [layer.name for layer in viewer.layers]
    assert names == ["crop", "crop gt", "crop teacher (tiny_t) 28px", "crop student (tiny_s) 28px"]
    np.testing.assert_array_equal(viewer.layers["crop gt"].data, gt_before)
    assert len(network_calls) == 2
    for role, layer in zip(("teacher", "student"), viewer.layers[2:]):
        prov = layer.metadata[KEY]
        assert layer.data.shape == gt_before.shape and layer.data.dtype == np.int32
        assert prov["role"] == role and prov["image_layer"] == "crop" and prov["planes"] == [None]
        assert prov["model_path"].endswith(f"tiny_{role[0]}.safetensors") and prov["parameters"] > 0
        assert prov["decode"]["min_size"] >= 0 and prov["network_seconds"] > 0 and prov["decode_seconds"] > 0
        assert set(prov["ground_truth_scores"]) == {"f1", "aji", "n_a", "n_b"}
        assert prov["objects"] == len(np.unique(layer.data)) - 1 and prov["inputs"] == "28 px, not inverted, luminance"
    agreement = widget.last_result.agreement
    assert 0 <= agreement["f1"] <= 1 and 0 <= agreement["aji"] <= 1
    assert viewer.layers[3].metadata[KEY]["agreement_with_teacher"] == agreement
    report = widget.report.value
    teacher_objects = viewer.layers[2].metadata[KEY]["objects"]
    assert f"teacher [tiny_t]: {teacher_objects} objects; inputs 28 px, not inverted, luminance; network" in report
    assert "student vs teacher: F1" in report and "vs ground truth" in report


def test_run_both_shows_side_by_side_and_restores_the_users_view(setup, qtbot, notes):
    viewer, widget = setup
    grid = viewer.canvas.grid
    grid.shape = (2, 2)  # the user's own grid settings, grid off
    gt = viewer.layers["crop gt"]
    widget.ground_truth.value = gt
    widget.run(("teacher", "student"))
    wait(qtbot, widget)
    image, teacher, student = viewer.layers["crop"], viewer.layers[2], viewer.layers[3]
    assert grid.enabled and sorted(grid.actual_shape(viewer.layers)) == [1, 3]  # a row or a column, whichever is larger
    assert not gt.visible and image.visible and teacher.visible and student.visible
    cells = {grid.position(viewer.layers.index(layer), viewer.layers) for layer in (image, teacher, student)}
    assert len(cells) == 3  # one cell each
    assert grid.position(viewer.layers.index(image), viewer.layers) == (0, 0)
    widget.side_by_side.value = False  # the toggle restores what the user had
    assert not grid.enabled and tuple(grid.shape) == (2, 2) and gt.visible
    widget.run(("teacher",))  # a single model never switches the grid on
    wait(qtbot, widget)
    assert not grid.enabled
    assert errors(notes) == []


def test_rerun_with_same_settings_replaces_and_new_settings_add_a_layer(setup, qtbot, network_calls, notes):
    viewer, widget = setup
    user = viewer.add_labels(np.ones((160, 200), np.int32), name="crop teacher (tiny_t) 28px")  # same name as a result
    for _ in range(2):
        widget.run(("teacher",))
        wait(qtbot, widget)
    made = [layer for layer in labels_layers(viewer) if KEY in layer.metadata]
    assert len(made) == 1 and made[0].name == "crop teacher (tiny_t) 28px [1]"  # napari keeps names unique
    assert (user.data == 1).all() and KEY not in user.metadata
    widget.diameter.value = 40.0
    widget.run(("teacher",))
    wait(qtbot, widget)
    made = [layer.name for layer in labels_layers(viewer) if KEY in layer.metadata]
    assert made == ["crop teacher (tiny_t) 28px [1]", "crop teacher (tiny_t) 40px"]
    assert viewer.layers[-1].metadata[KEY]["run"]["diameter"] == 40.0
    assert len(network_calls) == 2  # the second run reused the cached network output
    assert errors(notes) == []


def test_grid_shape_shows_the_images_largest():
    from napari_graphkd._widgets._segment import grid_shape

    assert grid_shape((750, 510), (520, 696), 3) == (3, 1)  # a narrow canvas: one above the other
    assert grid_shape((600, 1800), (520, 696), 3) == (1, 3)  # a wide one: side by side
    assert grid_shape((1000, 1000), (520, 696), 4) == (2, 2)


def test_long_image_names_are_shortened_in_layer_names(setup, qtbot, crop, notes):
    viewer, widget = setup
    long = "plate7_well_B03_site_12_channel_DAPI_exposure_40ms_2026-11-29.tif"
    viewer.add_image(crop[0], name=long)
    widget.image.value = viewer.layers[long]
    widget.run(("teacher",))
    wait(qtbot, widget)
    layer = viewer.layers[-1]
    assert len(layer.name) < 50 and "…" in layer.name and layer.name.endswith("teacher (tiny_t) 28px")
    assert layer.metadata[KEY]["image_layer"] == long  # full provenance in metadata


def test_decoder_change_redecodes_without_rerunning_the_network(setup, qtbot, network_calls, notes):
    viewer, widget = setup
    widget.run(("teacher", "student"))
    wait(qtbot, widget)
    teacher, student = viewer.layers[2], viewer.layers[3]
    assert len(network_calls) == 2
    assert not widget.min_size.enabled
    widget.own_settings.value = False  # enables the controls and re-decodes
    wait(qtbot, widget)
    assert widget.min_size.enabled
    widget.foreground_threshold.value = 0.0
    wait(qtbot, widget)
    widget.min_size.value = 5000
    wait(qtbot, widget)
    assert len(network_calls) == 2  # never re-ran
    assert len(viewer.layers) == 4  # updated in place: these layers are the widget's own
    for layer in (teacher, student):
        prov = layer.metadata[KEY]
        assert prov["decode"]["min_size"] == 5000 and prov["decode"]["foreground_threshold"] == 0.0
        assert prov["network_cached"] is True
    assert errors(notes) == []


def test_painted_result_is_left_alone_by_redecode(setup, qtbot, notes):
    viewer, widget = setup
    widget.run(("teacher",))
    wait(qtbot, widget)
    result = viewer.layers[2]
    result.paint((5, 5), 99, refresh=False)  # the user corrects the result by hand
    painted = result.data.copy()
    widget.own_settings.value = False
    wait(qtbot, widget)
    assert result.metadata[KEY]["edited"] is True
    np.testing.assert_array_equal(result.data, painted)
    widget.run(("teacher",))  # the painted layer is the user's now: a new result layer
    wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers][-2:] == ["crop teacher (tiny_t) 28px", "crop teacher (tiny_t) 28px [1]"]
    assert any("edited by hand" in message for _, message in notes)


def test_classical_baseline(setup, qtbot, notes):
    viewer, widget = setup
    widget.run(("classical",))
    wait(qtbot, widget)
    layer = viewer.layers[-1]
    assert layer.name == "crop classical 28px" and layer.data.max() > 0
    assert layer.metadata[KEY]["model_spec"] == "classical"
    assert "classical [classical]: " in widget.report.value and "no network" in widget.report.value


def test_stack_current_plane_and_all_planes(setup, qtbot, crop, network_calls, notes):
    viewer, widget = setup
    stack = small_stack(crop[0][:64, :96])
    viewer.add_image(stack, name="stack", scale=(2.0, 1.0, 1.0))
    widget.image.value = viewer.layers["stack"]
    viewer.dims.set_point(0, 2.0)  # world z = 2 -> plane 1 (scale 2)
    widget.run(("teacher",))
    wait(qtbot, widget)
    one = viewer.layers[-1]
    assert one.data.shape == (1, 64, 96) and one.metadata[KEY]["planes"] == [1]
    assert tuple(one.translate) == (2.0, 0.0, 0.0) and tuple(one.scale) == (2.0, 1.0, 1.0)
    widget.all_planes.value = True
    widget.run(("teacher", "student"))
    wait(qtbot, widget)
    assert widget.progress.value == 100
    teacher, student = viewer.layers[-2:]
    assert teacher.data.shape == student.data.shape == (3, 64, 96)
    assert teacher.metadata[KEY]["planes"] == [0, 1, 2] and tuple(teacher.translate) == (0.0, 0.0, 0.0)
    assert len(network_calls) == 1 + 2 * 3 - 1  # plane 1 of the teacher came from the cache
    assert errors(notes) == []


def test_cancel_stops_the_job_and_adds_nothing(setup, qtbot, monkeypatch, notes):
    viewer, widget = setup
    from napari_graphkd.segment import ModelSegmenter

    original = ModelSegmenter.run_network

    def cancel_then_run(self, image, **kwargs):
        widget.cancel()  # as if the user pressed Cancel while the network runs
        return original(self, image, **kwargs)

    monkeypatch.setattr(ModelSegmenter, "run_network", cancel_then_run)
    widget.run(("teacher", "student"))
    wait(qtbot, widget)
    assert len(viewer.layers) == 2
    assert any("cancelled" in message for _, message in notes)


def test_bad_inputs_become_notifications(setup, qtbot, tmp_path, monkeypatch, notes):
    viewer, widget = setup
    n_layers = len(viewer.layers)

    nan = np.full((40, 40), np.nan, dtype=np.float32)
    viewer.add_image(nan, name="nan")
    widget.image.value = viewer.layers["nan"]
    widget.run(("teacher",))
    wait(qtbot, widget)
    assert "NaN" in errors(notes)[-1]

    viewer.add_image(np.zeros((2, 2, 32, 32), np.float32), name="4d")
    widget.image.value = viewer.layers["4d"]
    assert widget.run(("teacher",)) is None
    assert "dimensions" in errors(notes)[-1]

    widget.image.value = viewer.layers["crop"]
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    widget.pickers["student"].path.value = str(corrupt)
    assert "not available" in widget.pickers["student"].info.value
    assert widget.run(("student",)) is None
    assert "corrupt" in errors(notes)[-1] or "not a readable" in errors(notes)[-1]

    widget.pickers["student"].path.value = str(tmp_path / "nowhere.safetensors")
    assert widget.run(("student",)) is None
    assert "choose a checkpoint file" in errors(notes)[-1]

    import napari_graphkd.segment as segment

    monkeypatch.setattr(segment, "bundled_path", lambda name: tmp_path / f"no_{name}.safetensors")
    widget.pickers["teacher"].source.value = "teacher"
    assert "missing" in widget.pickers["teacher"].info.value
    assert widget.run(("teacher",)) is None
    assert "bundled teacher is missing" in errors(notes)[-1]

    viewer.add_labels(np.zeros((10, 10), np.int32), name="small gt")
    widget.pickers["teacher"].source.value = "file"  # back to the tiny checkpoint
    widget.ground_truth.value = viewer.layers["small gt"]
    widget.run(("teacher",))
    wait(qtbot, widget)
    assert any("does not match" in message for message in errors(notes, "warning"))
    assert len([layer for layer in viewer.layers if KEY in layer.metadata]) == 1  # only the last, valid run
    assert len(viewer.layers) == n_layers + 4

    for name in ("crop", "nan", "4d"):
        viewer.layers.remove(name)
    assert widget.image.value is None
    assert widget.run(("teacher",)) is None
    assert "choose an Image layer" in errors(notes)[-1]


def test_tiny_tiles_go_through_the_library_tiling(setup, qtbot, monkeypatch, network_calls, notes):
    viewer, widget = setup
    import napari_graphkd.inference as inference

    tiles = []
    original = inference._network
    monkeypatch.setattr(inference, "_network", lambda model, image: tiles.append(image.shape) or original(model, image))
    widget.run(("teacher",))
    wait(qtbot, widget)
    assert tiles == [(160, 200)]
    widget.tile.value = 128  # tiles of 128 px overlapping by 64: the 160x200 crop needs 2x3 of them
    seen = []
    widget.progress.changed.connect(seen.append)
    widget.run(("teacher",))
    wait(qtbot, widget)
    assert tiles[1:] == [(128, 128)] * 6
    steps = sorted(set(seen) - {0, 100})
    assert len(steps) >= 5 and seen[-1] == 100 and seen == sorted(seen)  # the bar moves tile by tile
    assert len(network_calls) == 2  # the tile size is part of the cache key
    assert viewer.layers[-1].data.shape == (160, 200) and viewer.layers[-1].metadata[KEY]["run"]["tile"] == 128
    assert errors(notes) == []


def test_missing_bundled_model_is_announced_when_chosen(setup, tmp_path, monkeypatch, notes):
    _, widget = setup
    import napari_graphkd.segment as segment

    monkeypatch.setattr(segment, "bundled_path", lambda name: tmp_path / f"no_{name}.safetensors")
    widget.pickers["student"].source.value = "student"
    assert any("student model not available" in m and "missing" in m for m in errors(notes, "warning"))


def test_widgets_work_when_opened_from_the_plugin_menu(make_napari_viewer, qtbot, crop, checkpoints, network_calls, notes):
    viewer = make_napari_viewer()
    _, segment = viewer.window.add_plugin_dock_widget("napari-graphkd", "Segment (teacher vs student)")
    _, overlays = viewer.window.add_plugin_dock_widget("napari-graphkd", "Graph and affinity overlays")
    assert isinstance(segment, SegmentWidget)
    viewer.add_image(crop[0], name="crop")  # napari hands plugins a proxy of the viewer: all must still work
    assert segment.image.value is viewer.layers["crop"]
    use_files(segment, *checkpoints)
    assert segment.run_settings().kwargs() == {"diameter": "auto", "invert": "auto", "channel": "auto", "tile": 1024}
    segment.run(("teacher", "student"))
    wait(qtbot, segment)
    runs = len(network_calls)  # the automatic diameter takes one or more passes per model
    rules = viewer.layers[1].metadata[KEY]["input_rules"]
    assert rules["invert"] is False and rules["channel"] == "luminance" and {"invert", "channel", "diameter"} <= set(rules["estimated"])
    assert viewer.layers[1].metadata[KEY]["run"]["diameter"] == rules["diameter"]  # what re-decoding and overlays reuse
    assert "(auto)" in segment.report.value
    segment.own_settings.value = False
    wait(qtbot, segment)
    assert len(viewer.layers) == 3 and len(network_calls) == runs  # re-decoding re-runs no network, estimates nothing
    assert viewer.layers[1].metadata[KEY]["decode"]["min_size"] == segment.min_size.value
    assert overlays.result.value is viewer.layers[1] and overlays.other.value is viewer.layers[2]
    overlays.affinity_map()
    wait(qtbot, overlays)
    assert viewer.layers[-1].name == f"{viewer.layers[1].name} affinity 1 px up" and len(network_calls) == runs
    assert errors(notes) == []


def test_docks_fit_a_small_screen_whatever_the_layer_names(make_napari_viewer, qtbot, crop):
    from napari_graphkd._widgets import FinetuneWidget, OverlaysWidget
    from napari_graphkd._widgets._layout import MAX_DOCK_WIDTH

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1280, 800)
    long = "plate7_well_B03_site_12_channel_DAPI_exposure_40ms_2026-11-29.tif"
    viewer.add_image(crop[0], name=long)
    viewer.add_labels(crop[1], name=long + " ground truth")
    widgets = [SegmentWidget(viewer), OverlaysWidget(viewer), FinetuneWidget(viewer)]
    docks = [viewer.window.add_dock_widget(w, name=type(w).__name__) for w in widgets]
    window = viewer.window._qt_window
    qtbot.waitUntil(lambda: all(isinstance(dock.widget(), QScrollArea) for dock in docks), timeout=5000)
    canvas = viewer.window._qt_viewer.canvas.native
    zoom = viewer.camera.zoom  # the view was refitted once the docks narrowed the canvas: the whole image shows
    assert zoom * 200 <= canvas.width() + 1 and zoom * 160 <= canvas.height() + 1

    def fits() -> bool:
        window.resize(1280, 800)
        return window.height() <= 800

    qtbot.waitUntil(fits, timeout=5000)  # once the docks scroll, the window can be as small as the screen
    for widget, dock in zip(widgets, docks):
        size = dock.minimumSizeHint().expandedTo(dock.minimumSize())
        print(f"\n{type(widget).__name__}: minimum dock size {size.width()} x {size.height()}")
        assert size.width() <= MAX_DOCK_WIDTH, (type(widget).__name__, size.width())
        assert size.height() <= 200  # taller content scrolls inside the dock
    segment = widgets[0]
    assert segment.image.native.toolTip() == long  # the full name, elided in the dropdown
    assert not segment.advanced_section.isExpanded()
    assert set(window.tabifiedDockWidgets(docks[0])) == set(docks[1:])  # one tab group, not a tall stack
    print(f"canvas {canvas.width()} x {canvas.height()} in a 1280 x 800 window")
    assert canvas.width() >= 450 and canvas.height() >= 600  # a usable canvas beside the docks and the layer list
    assert viewer.window.dock_widgets["SegmentWidget"] is segment  # napari still finds the widget in its dock


def test_result_is_discarded_when_its_image_is_closed(setup, qtbot, monkeypatch, notes):
    viewer, widget = setup
    from napari_graphkd.segment import ModelSegmenter

    original = ModelSegmenter.run_network
    monkeypatch.setattr(ModelSegmenter, "run_network", lambda self, image, **kw: (time.sleep(0.5), original(self, image, **kw))[1])
    widget.run(("teacher",))
    viewer.layers.remove("crop")  # the user closes the image while the network runs
    wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["crop gt"]
    assert any("was closed" in message for message in errors(notes, "warning"))


def test_error_clears_the_previous_report(setup, qtbot, notes):
    viewer, widget = setup
    widget.run(("teacher",))
    wait(qtbot, widget)
    assert "objects" in widget.report.value
    viewer.add_image(np.full((40, 40), np.nan, np.float32), name="nan")
    widget.image.value = viewer.layers["nan"]
    widget.run(("teacher",))
    wait(qtbot, widget)
    assert widget.report.value.startswith("failed:") and "NaN" in widget.report.value


def test_cancel_answers_within_a_second_even_in_a_long_tile(setup, qtbot, monkeypatch, notes):
    viewer, widget = setup
    from napari_graphkd.segment import ModelSegmenter

    original = ModelSegmenter.run_network
    monkeypatch.setattr(ModelSegmenter, "run_network", lambda self, image, **kw: (time.sleep(4), original(self, image, **kw))[1])
    widget.run(("teacher", "student"))
    qtbot.wait(300)
    latency = cancel_latency(qtbot, widget)
    print(f"\ncancel during a 4 s tile -> job finished in {latency:.2f} s")
    assert latency < 1.0
    assert len(viewer.layers) == 2 and any("cancelled" in message for _, message in notes)


def test_bright_field_image_gets_a_concrete_suggestion(setup, qtbot, notes):
    import tifffile

    path = sorted((Path(__file__).parents[1] / "examples" / "data" / "brightfield").glob("test/images/*.tif"))
    if not path:
        pytest.skip("the bright-field example crops are not in this checkout")
    viewer, widget = setup
    viewer.add_image(tifffile.imread(path[0]), name="bright-field")
    widget.image.value = viewer.layers["bright-field"]
    widget.pickers["student"].source.value = "student"  # the bundled student, as a user would run it
    widget.run(("student",))
    wait(qtbot, widget)
    warning = [m for m in errors(notes, "warning") if "unlike the model's training data" in m]
    assert len(warning) == 1 and "set the nuclei to 'dark on bright'" in warning[0]
    assert "! the image looks like dark nuclei" in widget.report.value
    assert viewer.layers[-1].metadata[KEY]["advice"]
