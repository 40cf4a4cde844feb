"""The Segment widget on lazy (Dask) image layers: the chunked path into Zarr, cancel, and the field of view alone."""
from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
from widget_utils import checkpoints, errors, fresh_cache, notes, use_files, wait  # noqa: F401 - fixtures

from napari_graphkd import metrics
from napari_graphkd._widgets import SegmentWidget
from napari_graphkd._widgets._layers import KEY
from napari_graphkd.large import run as large_run
from napari_graphkd.large.view import view_box, wants_chunked
from napari_graphkd.segment import load_segmenter, segment_any


def test_lazy_or_huge_data_takes_the_chunked_path():
    small = np.zeros((64, 64), np.uint16)
    assert not wants_chunked(small)
    assert wants_chunked(da.from_array(small, chunks=32)) and wants_chunked([small, small[::2, ::2]])
    assert wants_chunked(small, max_pixels=100)


def test_view_box_is_the_visible_part_of_the_plane_clipped_to_it():
    # 200x400 screen px at zoom 2 show 100x200 world units around (50, 300)
    assert view_box((50, 300), 2.0, (200, 400), (520, 696)) == (0, 100, 200, 400)
    # a plane scaled by 2 and shifted by (10, 20) world units: data px = (world - translate) / scale
    assert view_box((110, 220), 1.0, (100, 100), (520, 696), (2, 2), (10, 20)) == (25, 75, 75, 125)
    assert view_box((-500, -500), 1.0, (100, 100), (520, 696))[:2] == (0, 0)  # off screen: empty


@pytest.fixture()
def lazy(make_napari_viewer, sample, checkpoints):
    """Viewer with the bundled sample as a Dask layer (256 px chunks) and a docked Segment widget."""
    torch.set_num_threads(1)
    viewer = make_napari_viewer()
    image = sample[0]
    viewer.add_image(da.from_array(image, chunks=256), name="lazy")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    use_files(widget, *checkpoints)
    widget.image.value = viewer.layers["lazy"]
    widget.chunk.value = 256
    return viewer, widget, image


def test_a_dask_layer_runs_chunked_into_a_zarr_backed_labels_layer(lazy, qtbot, notes, monkeypatch):
    viewer, widget, image = lazy
    calls = []
    original = large_run.segment_large
    monkeypatch.setattr(large_run, "segment_large", lambda *a, **k: calls.append(k) or original(*a, **k))
    widget.pickers["student"].source.value = "student"
    widget.diameter.value = 0.0  # automatic, as the whole-image reference
    assert widget.run(("student",)) is not None
    wait(qtbot, widget)
    assert errors(notes) == [] and len(calls) == 1 and calls[0]["chunk"] == 256
    layer = viewer.layers[-1]
    assert isinstance(layer.data, da.Array) and layer.data.shape == image.shape  # read from the store on disk
    prov = layer.metadata[KEY]
    store = Path(prov["chunked"]["store"])
    assert store.is_dir() and not Path(str(store) + ".partial").exists() and prov["model"] == "student"
    whole = segment_any(load_segmenter("student"), image).labels
    assert metrics.f1_at(whole, np.asarray(layer.data), 0.5) >= 0.99
    assert widget.progress.value == 100


def test_cancel_leaves_no_layer_and_no_store(lazy, qtbot, notes):
    viewer, widget, _ = lazy
    before = len(viewer.layers)
    assert widget.run(("student",)) is not None
    widget.cancel()
    wait(qtbot, widget)
    assert len(viewer.layers) == before and errors(notes) == []
    assert list(Path(widget._store).iterdir()) == []


def test_field_of_view_segments_only_the_visible_box_in_place(lazy, qtbot, notes):
    viewer, widget, image = lazy
    camera = getattr(getattr(viewer, "scene", None), "camera", None) or viewer.camera
    camera.center, camera.zoom = (200, 300), 4.0
    box = widget.visible_box(viewer.layers["lazy"])
    y0, y1, x0, x1 = box
    assert 0 < (y1 - y0) * (x1 - x0) < image.size / 4  # zoomed in: a small part of the image
    widget.field_of_view.value = True
    widget.diameter.value, widget.invert.value, widget.channel.value = 28.0, False, "luminance"
    assert widget.run(("student",)) is not None
    wait(qtbot, widget)
    assert errors(notes) == []
    layer = viewer.layers[-1]
    assert layer.name.endswith(" view") and layer.metadata[KEY]["field_of_view"] == list(box)
    assert layer.data.shape == (y1 - y0, x1 - x0)
    np.testing.assert_allclose(layer.translate, (y0, x0))


def test_a_multiscale_layer_runs_its_full_resolution_level(make_napari_viewer, sample, checkpoints, qtbot, notes):
    viewer = make_napari_viewer()
    image = sample[0][:300, :400]
    viewer.add_image([da.from_array(image, chunks=256), da.from_array(image[::2, ::2], chunks=256)], name="pyramid",
                     multiscale=True)
    widget = SegmentWidget(viewer)
    use_files(widget, *checkpoints)
    widget.image.value, widget.chunk.value = viewer.layers["pyramid"], 256
    widget.diameter.value, widget.invert.value = 28.0, False
    assert widget.run(("teacher", "student")) is None  # one model at a time, said in one line
    assert "one network model at a time" in errors(notes)[-1]
    assert widget.run(("teacher",)) is not None
    wait(qtbot, widget)
    layer = viewer.layers[-1]
    assert layer.data.shape == image.shape and layer.metadata[KEY]["role"] == "teacher" and layer.name.endswith("chunked")
