"""The widgets on a (Z,Y,X) layer with 3D models: whole-volume results, progress, cancel, 3D overlays, fine-tuning."""
from __future__ import annotations

import numpy as np
import pytest
from widget_utils import checkpoints, errors, fresh_cache, network_calls, notes, use_files, wait  # noqa: F401 - fixtures

from napari_graphkd._widgets import FinetuneWidget, OverlaysWidget, SegmentWidget
from napari_graphkd._widgets._layers import KEY
from napari_graphkd.io.checkpoint import read_metadata
from volume_utils import blob_volume, volume_checkpoint


@pytest.fixture()
def volume_setup(make_napari_viewer, tmp_path):
    """A viewer with a small anisotropic volume (scale 2,1,1) and a Segment widget using two tiny 3D checkpoints."""
    teacher = volume_checkpoint(tmp_path / "t3d.safetensors")
    student = volume_checkpoint(tmp_path / "s3d.safetensors", voxel_size=(1.0, 1.0, 1.0))
    viewer = make_napari_viewer()
    volume, truth = blob_volume((8, 40, 48))
    viewer.add_image(volume, name="vol", scale=(2.0, 1.0, 1.0))
    viewer.add_labels(truth, name="vol gt", scale=(2.0, 1.0, 1.0))
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    use_files(widget, teacher, student)
    widget.image.value = viewer.layers["vol"]
    widget.tile.value = 256  # 40-voxel cubes: several tiles per volume
    return viewer, widget


def test_a_3d_model_segments_the_layer_as_one_volume(volume_setup, qtbot, network_calls, notes):
    viewer, widget = volume_setup
    widget.ground_truth.value = viewer.layers["vol gt"]
    widget.all_planes.value = False  # ignored for 3D models: the volume runs whole
    fractions = []
    worker = widget.run(("teacher", "student"))
    worker.yielded.connect(fractions.append)
    wait(qtbot, widget)
    assert errors(notes) == []
    assert [shape for _, shape in network_calls] == [(8, 40, 48)] * 2  # one run per model, on the whole volume
    teacher, student = viewer.layers[-2:]
    for layer in (teacher, student):
        prov = layer.metadata[KEY]
        assert layer.data.shape == (8, 40, 48) and prov["volume"] and prov["planes"] == [None]
        assert tuple(layer.scale) == (2.0, 1.0, 1.0) and prov["run"]["voxel_size"] == (2.0, 1.0, 1.0)
        assert prov["ground_truth_scores"]["n_a"] == 3  # scored as 3D objects, not per plane
    assert "voxel 2:1:1 (z:y:x)" in teacher.metadata[KEY]["inputs"]
    assert fractions and fractions == sorted(fractions) and len(fractions) >= 4  # per tile of each model
    assert "student vs teacher" in widget.report.value
    assert "3D (segments volumes as a whole, trained at voxel 2:1:1 z:y:x)" in widget.pickers["teacher"].info.value
    calls = len(network_calls)
    widget.own_settings.value = False  # decoder controls: re-decode the cached 3D outputs, no network
    widget.min_size.value = 5
    wait(qtbot, widget)
    assert len(network_calls) == calls and errors(notes) == []
    assert viewer.layers[-1] is student and student.metadata[KEY]["decode"]["min_size"] == 5


def test_mixing_2d_and_3d_models_or_2d_layers_notifies(volume_setup, qtbot, checkpoints, crop, notes):
    viewer, widget = volume_setup
    n_layers = len(viewer.layers)
    widget.pickers["student"].path.value = str(checkpoints[1])  # a 2D student next to the 3D teacher
    assert widget.run(("teacher", "student")) is None
    assert "run them one at a time" in errors(notes)[-1]
    viewer.add_image(crop[0], name="flat")
    widget.image.value = viewer.layers["flat"]
    assert widget.run(("teacher",)) is None
    assert "'flat' is not a (Z,Y,X) volume" in errors(notes)[-1]
    assert len(viewer.layers) == n_layers + 1  # nothing added but the image


def test_cancel_a_volume_run(volume_setup, qtbot, monkeypatch, notes):
    viewer, widget = volume_setup
    n_layers = len(viewer.layers)
    from napari_graphkd.segment import ModelSegmenter

    original = ModelSegmenter.run_network

    def cancel_then_run(self, image, **kwargs):
        widget.cancel()  # as if the user pressed Cancel while the 3D network runs
        return original(self, image, **kwargs)

    monkeypatch.setattr(ModelSegmenter, "run_network", cancel_then_run)
    widget.run(("teacher",))
    wait(qtbot, widget)
    assert len(viewer.layers) == n_layers
    assert any("cancelled" in message for _, message in notes)


def test_overlays_of_a_volume_have_z_offsets_and_3d_graphs(volume_setup, qtbot, notes):
    viewer, widget = volume_setup
    widget.run(("teacher",))
    wait(qtbot, widget)
    result = viewer.layers[-1]
    result.data = blob_volume((8, 40, 48))[1]  # three real objects to draw the graph of
    overlays = OverlaysWidget(viewer)
    viewer.window.add_dock_widget(overlays)
    overlays.result.value = result
    names = [overlays.offset.native.itemText(i) for i in range(overlays.offset.native.count())]
    assert names[0] == "1 plane back" and "1 px up" in names and "1 px left" in names
    overlays.offset.value = 0
    overlays.affinity_map()
    wait(qtbot, overlays)
    overlays.instance_graph()
    wait(qtbot, overlays)
    assert errors(notes) == []
    aff, nodes, edges = viewer.layers[-3:]
    assert aff.data.shape == (8, 40, 48) and tuple(aff.scale) == (2.0, 1.0, 1.0)
    assert aff.metadata[KEY]["offset"] == [-1, 0, 0]
    assert nodes.data.shape == (3, 3) and 0 < nodes.data[:, 0].min() < 8  # (z, y, x) centroids inside the volume
    assert edges.data.shape[1:] == (2, 3) and len(edges.data) == 3  # k=4 neighbours of three nodes: every pair
    viewer.dims.ndisplay = 3
    assert viewer.dims.ndisplay == 3


def test_finetune_trains_3d_models_on_a_painted_volume_layer(volume_setup, qtbot, tmp_path, checkpoints, notes):
    viewer, widget = volume_setup
    finetune = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(finetune)
    painted = viewer.add_labels(viewer.layers["vol gt"].data.copy(), name="painted", scale=(2.0, 1.0, 1.0))
    finetune.rows[0].image.value, finetune.rows[0].painted.value = viewer.layers["vol"], painted
    finetune.pickers["teacher"].source.value = finetune.pickers["student"].source.value = "file"
    finetune.pickers["teacher"].path.value = widget.pickers["teacher"].path.value  # trained at voxel 2:1:1
    finetune.pickers["student"].path.value = widget.pickers["student"].path.value  # trained at voxel 1:1:1
    assert finetune.start() is None and "different voxel proportions" in errors(notes)[-1]
    finetune.pickers["student"].path.value = str(checkpoints[1])  # a 2D student
    assert finetune.start() is None and "the teacher is a 3D model and the student a 2D one" in errors(notes)[-1]
    student = volume_checkpoint(tmp_path / "s3d-aniso.safetensors")  # the teacher's voxel size
    finetune.pickers["student"].path.value = str(student)
    finetune.mode.value, finetune.steps.value = "finetune", 2
    finetune.folder.value = str(tmp_path / "models")
    n_errors = len(errors(notes))
    assert finetune.start() is not None
    wait(qtbot, finetune)
    assert len(errors(notes)) == n_errors
    new = tmp_path / "models" / "student-finetuned.safetensors"
    meta = read_metadata(new)
    assert meta["config"]["ndim"] == 3 and meta["finetune"]["voxel_size"] == [2.0, 1.0, 1.0]  # from the layer's scale
    assert widget.pickers["student"].path.value == new  # the Segment widget segments with it now
    assert "volumes at voxel 2:1:1 (z:y:x)" in finetune.report.value and "student after" in finetune.report.value
    finetune.rows[0].painted.value = viewer.add_labels(np.zeros((40, 48), np.int32), name="plane")
    assert finetune.start() is None and "the models are 3D" in errors(notes)[-1]


def test_a_series_of_volumes_and_its_overlays(volume_setup, qtbot, notes):
    viewer, widget = volume_setup
    volume, truth = blob_volume((8, 40, 48))
    viewer.add_image(np.stack([volume, volume[:, ::-1]]), name="series", scale=(1.0, 2.0, 1.0, 1.0))
    widget.image.value = viewer.layers["series"]
    widget.run(("teacher",))
    wait(qtbot, widget)
    assert errors(notes) == []
    result = viewer.layers[-1]
    assert result.data.shape == (2, 8, 40, 48) and result.metadata[KEY]["volume"]
    assert result.metadata[KEY]["run"]["voxel_size"] == (2.0, 1.0, 1.0)  # the last three axes of the layer's scale
    result.data = np.stack([truth, truth[:, ::-1]])
    overlays = OverlaysWidget(viewer)
    viewer.window.add_dock_widget(overlays)
    overlays.result.value = result
    viewer.dims.set_point(0, 1)
    overlays.instance_graph()
    wait(qtbot, overlays)
    assert errors(notes) == []
    nodes, edges = viewer.layers[-2:]
    assert nodes.data.shape == (3, 4) and (nodes.data[:, 0] == 0).all() and tuple(nodes.translate)[0] == 1.0
    assert edges.data.shape[1:] == (2, 4)
