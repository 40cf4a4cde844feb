"""Large decodes in a worker process give the labels of in-process decoding."""
import numpy as np
import pytest

from napari_graphkd.decode import process
from napari_graphkd.decode.policy import decode_output
from napari_graphkd.segment import load_segmenter, plane_output


@pytest.fixture(scope="module")
def output(sample):
    student = load_segmenter("student")
    return plane_output(student, sample[0], None)[0], student.decode_settings


def test_worker_labels_equal_in_process_labels_and_offloading_uses_the_worker(output, monkeypatch):
    out, settings = output
    here, _ = decode_output(out, settings)
    there, seconds = process.decode_in_worker(out, settings)
    assert there.dtype == here.dtype and np.array_equal(there, here) and here.max() > 50 and seconds > 0
    calls = []
    monkeypatch.setattr(process, "WORKER_PIXELS", 1000)
    monkeypatch.setattr(process, "decode_in_worker", lambda o, s, offsets=None: calls.append(o) or here_copy(here))
    monkeypatch.setattr(process, "_offload", True)
    assert np.array_equal(decode_output(out, settings)[0], here) and calls == [out]
    monkeypatch.setattr(process, "WORKER_PIXELS", 10**9)
    decode_output(out, settings)
    assert calls == [out]  # small outputs stay in this process


def test_volumes_decode_in_the_worker_with_their_offsets(monkeypatch):
    """A 3D model's output (with its own offsets) decodes in the worker to the in-process labels."""
    from napari_graphkd.affinity import offsets_for
    from napari_graphkd.segment import ModelSegmenter

    from volume_utils import FakeNet3d, blob_volume

    offsets = offsets_for(3)
    model = ModelSegmenter(model=FakeNet3d(), metadata={"name": "fake3d", "offsets": [list(o) for o in offsets]})
    out = model.run_network(blob_volume()[0])
    assert out.offsets == offsets
    here, _ = decode_output(out, model.decode_settings, offsets)
    there, _ = process.decode_in_worker(out, model.decode_settings, offsets)
    assert np.array_equal(there, here) and len(np.unique(here)) == 4  # three objects and background
    monkeypatch.setattr(process, "WORKER_PIXELS", 1000)
    monkeypatch.setattr(process, "_offload", True)
    calls = []
    monkeypatch.setattr(process, "decode_in_worker", lambda o, s, offsets=None: calls.append(offsets) or here_copy(here))
    decode_output(out, model.decode_settings, offsets)
    assert calls == [offsets]  # large volumes go to the worker too, with their offsets


def here_copy(labels):
    return labels.copy(), 0.0


def teardown_module():
    process.shutdown()
