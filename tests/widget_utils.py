"""Helpers for the napari widget tests: tiny checkpoints, notification capture, waiting for workers."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from napari_graphkd.io.checkpoint import save_checkpoint
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.segment import ModelSegmenter

torch.set_num_threads(1)
TIMEOUT_MS = 120_000


def tiny(path, seed: int):
    """A small random half-resolution network saved at ``path``."""
    torch.manual_seed(seed)
    return save_checkpoint(path, build_model(UNetConfig(widths=(4, 8, 8), stem_stride=2)), {"name": path.stem})


@pytest.fixture()
def checkpoints(tmp_path):
    """(teacher, student) tiny random checkpoints."""
    return tiny(tmp_path / "tiny_t.safetensors", 0), tiny(tmp_path / "tiny_s.safetensors", 1)


@pytest.fixture()
def notes():
    """Notifications shown during the test, as (severity name, message)."""
    from napari.utils.notifications import notification_manager

    seen: list[tuple[str, str]] = []

    def record(notification):
        seen.append((str(notification.severity).lower(), str(notification.message)))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture()
def network_calls(monkeypatch):
    """Count every ModelSegmenter.run_network call (the network really runs)."""
    calls: list[tuple] = []
    original = ModelSegmenter.run_network

    def counting(self, image, **kwargs):
        calls.append((self.name, image.shape))
        return original(self, image, **kwargs)

    monkeypatch.setattr(ModelSegmenter, "run_network", counting)
    return calls


@pytest.fixture(autouse=True)
def fresh_cache():
    """Every test starts with an empty network-output cache."""
    from napari_graphkd._widgets._state import CACHE

    CACHE.clear()
    yield
    CACHE.clear()


def wait(qtbot, widget, worker=None):
    """Wait until the widget's job (and the handling of its result) is done."""
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)


def cancel_latency(qtbot, widget) -> float:
    """Press the widget's Cancel as a user would; seconds until its job has finished."""
    pressed = time.perf_counter()
    widget.cancel_button.changed.emit(True)
    wait(qtbot, widget)
    return time.perf_counter() - pressed


def use_files(widget, teacher, student):
    """Point the Segment widget's model pickers at checkpoint files."""
    for role, path in (("teacher", teacher), ("student", student)):
        picker = widget.pickers[role]
        picker.source.value = "file"
        picker.path.value = str(path)


def errors(notes, severity="error"):
    """Messages of one severity."""
    return [message for sev, message in notes if severity in sev]


def labels_layers(viewer):
    """The viewer's Labels layers."""
    from napari.layers import Labels

    return [layer for layer in viewer.layers if isinstance(layer, Labels)]


def small_stack(image: np.ndarray, n: int = 3) -> np.ndarray:
    """A (n,H,W) stack of shifted copies of a crop (a time series stand-in)."""
    return np.stack([np.roll(image, 7 * i, axis=1) for i in range(n)])
