"""Bundled samples: the library loader, the napari sample-data contribution and the npe2 manifest."""
from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

from napari_graphkd._widgets import _sample_data
from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample

NUCLEI = {"bbbc039_P10_s2": 82, "bbbc039_A15_s5": 129, "bbbc039_I15_s5": 185}


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_load_sample(name):
    image, labels = load_sample(name)
    assert image.shape == labels.shape == (520, 696)
    assert image.dtype == np.uint16 and labels.dtype == np.int32
    assert len(np.unique(labels)) - 1 == NUCLEI[name]


def test_unknown_sample():
    with pytest.raises(ValueError, match="unknown sample"):
        load_sample("nope")


def test_manifest_lists_every_sample_and_validates():
    import npe2

    manifest = npe2.PluginManifest.from_file(str(resources.files("napari_graphkd") / "napari.yaml"))
    assert manifest.name == "napari-graphkd"
    assert [s.key for s in manifest.contributions.sample_data] == list(SAMPLE_NAMES)
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    for sample in manifest.contributions.sample_data:
        module, function = commands[sample.command].split(":")
        data = getattr(_sample_data, function)()
        assert [layer_type for _, _, layer_type in data] == ["image", "labels"]
        assert data[0][1]["name"] == sample.key and data[1][1]["name"] == f"{sample.key} ground truth"
    widgets = [w.display_name for w in manifest.contributions.widgets]
    assert widgets == ["Segment (teacher vs student)", "Graph and affinity overlays", "Fine-tune / distil"]


def test_open_sample_in_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-graphkd", "bbbc039_A15_s5")
    assert [layer.name for layer in viewer.layers] == ["bbbc039_A15_s5", "bbbc039_A15_s5 ground truth"]
    image, labels = load_sample("bbbc039_A15_s5")
    np.testing.assert_array_equal(viewer.layers[0].data, image)
    np.testing.assert_array_equal(viewer.layers[1].data, labels)
