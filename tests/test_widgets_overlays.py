"""The overlays widget end to end: affinity maps, instance graphs and teacher-vs-student disagreement."""
from __future__ import annotations

import numpy as np
import pytest
from widget_utils import checkpoints, errors, fresh_cache, network_calls, notes, small_stack, use_files, wait  # noqa: F401

from napari_graphkd._widgets import OverlaysWidget, SegmentWidget
from napari_graphkd._widgets._layers import KEY
from napari_graphkd._widgets._state import CACHE
from napari_graphkd.affinity import OFFSETS
from napari_graphkd.graph import instance_centroids
from qtpy.QtWidgets import QLabel


@pytest.fixture()
def segmented(make_napari_viewer, qtbot, crop, checkpoints):
    """Viewer with the crop segmented by both tiny networks; the teacher result holds the ground truth.

    (Random networks give arbitrary labels; putting the real nuclei in the teacher layer makes the
    graph checkable while the embeddings still come from the cached network outputs.)
    """
    viewer = make_napari_viewer()
    image, gt = crop
    viewer.add_image(image, name="crop")
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment)
    use_files(segment, *checkpoints)
    segment.image.value = viewer.layers["crop"]
    segment.run(("teacher", "student"))
    wait(qtbot, segment)
    teacher, student = viewer.layers[1], viewer.layers[2]
    teacher.data = gt
    overlays = OverlaysWidget(viewer)
    viewer.window.add_dock_widget(overlays)
    overlays.result.value = teacher
    overlays.other.value = student
    return viewer, overlays, teacher, student


def test_result_choices_are_network_results_only(segmented):
    viewer, overlays, teacher, student = segmented
    viewer.add_labels(np.zeros((8, 8), np.int32), name="user labels")
    overlays.reset_choices()
    assert list(overlays.result.choices) == [teacher, student]


def test_defaults_to_the_newest_teacher_student_pair(segmented, qtbot):
    viewer, overlays, teacher, student = segmented
    assert overlays.result.value is teacher and overlays.other.value is student  # set when the widget opened
    segment = next(w for w in viewer.window.dock_widgets.values() if isinstance(w, SegmentWidget))
    segment.diameter.value = 40.0
    segment.run(("teacher", "student"))
    wait(qtbot, segment)
    new_teacher, new_student = viewer.layers[-2:]
    assert new_teacher.name.endswith("40px") and overlays.result.value is new_teacher
    assert overlays.other.value is new_student


def test_legends_and_dock_titles(segmented):
    _, overlays, _, _ = segmented
    texts = [label.text() for legend in overlays.legends for label in legend.findChildren(QLabel)]
    assert any("cosine similarity" in t for t in texts) and "-1 unlike" in texts and "+1 alike" in texts
    assert any("disagreement" in t for t in texts) and "1 differ" in texts
    import npe2

    names = [w.display_name for w in npe2.PluginManager.instance().get_manifest("napari-graphkd").contributions.widgets]
    assert names and not any("&" in name for name in names)  # Qt would turn '&' into a mnemonic underline


def test_affinity_map_is_one_offset_and_keeps_the_viewer_2d(segmented, qtbot, network_calls, notes):
    viewer, overlays, teacher, _ = segmented
    assert viewer.dims.ndim == 2
    overlays.offset.value = 5  # (0, -5)
    overlays.affinity_map()
    wait(qtbot, overlays)
    layer = viewer.layers[-1]
    assert layer.name == f"{teacher.name} affinity 5 px left"
    assert layer.data.shape == (160, 200) and viewer.dims.ndim == 2  # no offset slider appears
    assert layer.blending == "additive" and layer.opacity < 1
    assert layer.metadata[KEY]["offset"] == list(OFFSETS[5]) == [0, -5]
    assert layer.metadata[KEY]["model_spec"] == teacher.metadata[KEY]["model_spec"]
    assert np.abs(layer.data).max() <= 1.0 + 1e-5
    assert network_calls == []  # from the Segment widget's cache
    assert errors(notes) == []


def test_instance_graph(segmented, qtbot, crop, network_calls, notes):
    viewer, overlays, teacher, _ = segmented
    overlays.k.value = 3
    overlays.max_distance.value = 60.0
    overlays.instance_graph()
    wait(qtbot, overlays)
    nodes, edges = viewer.layers[-2], viewer.layers[-1]
    ids, centroids = instance_centroids(crop[1])
    assert nodes.name == f"{teacher.name} graph nodes" and edges.name == f"{teacher.name} graph edges"
    np.testing.assert_allclose(nodes.data, centroids)
    assert nodes.features["id"].tolist() == ids.tolist()
    n_edges = len(edges.data)
    assert edges.data.shape == (n_edges, 2, 2) and 0 < n_edges <= 3 * len(ids)
    lengths = np.linalg.norm(edges.data[:, 1], axis=1)
    assert lengths.max() <= 60.0
    similarity = edges.features["similarity"].to_numpy()
    assert similarity.shape == (n_edges,) and (np.abs(similarity) <= 1 + 1e-9).all()
    assert edges.metadata[KEY]["k"] == 3 and edges.metadata[KEY]["max_distance"] == 60.0
    assert network_calls == []
    assert errors(notes) == []


def test_teacher_vs_student_disagreement(segmented, qtbot, network_calls, notes):
    viewer, overlays, teacher, student = segmented
    overlays.disagreement()
    wait(qtbot, overlays)
    image, edges = viewer.layers[-2], viewer.layers[-1]
    assert image.name == f"{teacher.name} vs {student.name} affinity disagreement"
    assert image.data.shape == (160, 200) and image.data.min() >= 0 and image.data.max() <= 2
    features = edges.features
    np.testing.assert_allclose(features["disagreement"], np.abs(features["cos_teacher"] - features["cos_student"]))
    assert edges.metadata[KEY]["other_model_spec"] == student.metadata[KEY]["model_spec"]
    assert network_calls == []
    assert errors(notes) == []


def test_overlay_reruns_network_when_not_cached(segmented, qtbot, network_calls):
    viewer, overlays, _, _ = segmented
    CACHE.clear()
    overlays.affinity_map()
    wait(qtbot, overlays)
    assert len(network_calls) == 1
    overlays.instance_graph()
    wait(qtbot, overlays)
    assert len(network_calls) == 1  # cached again


def test_overlays_of_a_stack_plane(make_napari_viewer, qtbot, crop, checkpoints, notes):
    viewer = make_napari_viewer()
    viewer.add_image(small_stack(crop[0][:64, :96]), name="stack")
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment)
    use_files(segment, *checkpoints)
    segment.all_planes.value = True
    segment.run(("teacher",))
    wait(qtbot, segment)
    result = viewer.layers[-1]
    result.data = small_stack(crop[1][:64, :96])  # real nuclei, as in the `segmented` fixture
    overlays = OverlaysWidget(viewer)
    viewer.window.add_dock_widget(overlays)
    overlays.result.value = result
    viewer.dims.set_point(0, 2)
    overlays.affinity_map()
    wait(qtbot, overlays)
    overlays.instance_graph()
    wait(qtbot, overlays)
    aff, nodes, edges = viewer.layers[-3:]
    assert aff.data.shape == (1, 64, 96) and tuple(aff.translate) == (2, 0, 0) and viewer.dims.ndim == 3
    n = len(np.unique(result.data[2])) - (result.data[2] == 0).any()
    assert n > 1 and nodes.data.shape == (n, 3) and (nodes.data[:, 0] == 0).all() and tuple(nodes.translate) == (2, 0, 0)
    assert edges.data.shape[1:] == (2, 3) and len(edges.data) > 0
    assert errors(notes) == []


def test_overlay_bad_inputs_notify(segmented, qtbot, notes):
    viewer, overlays, teacher, student = segmented
    overlays.other.value = None
    assert overlays.disagreement() is None
    assert "choose a second result" in errors(notes)[-1]
    viewer.layers.remove("crop")
    assert overlays.affinity_map() is None
    assert "no longer open" in errors(notes)[-1]
    viewer.layers.remove(teacher)
    viewer.layers.remove(student)
    assert overlays.result.value is None
    assert overlays.instance_graph() is None
    assert "choose a teacher or student result" in errors(notes)[-1]
