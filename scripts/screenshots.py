"""Screenshots of each widget in action, from a real napari viewer (run under Xvfb on a headless machine).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

Uses the bundled sample, the bundled teacher and student, and a short real fine-tuning run on a
partial annotation (a few ground-truth nuclei painted into a new Labels layer).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_graphkd._widgets import FinetuneWidget, OverlaysWidget, SegmentWidget


def wait(widget, timeout: float = 600.0) -> None:
    """Process Qt events until the widget's background job has finished."""
    start = time.time()
    while widget.busy:
        QApplication.processEvents()
        time.sleep(0.02)
        if time.time() - start > timeout:
            raise TimeoutError("widget job did not finish")
    for _ in range(20):
        QApplication.processEvents()


def shoot(viewer: napari.Viewer, path: Path) -> None:
    """Screenshot of the whole window (canvas and docked widgets)."""
    for _ in range(20):
        QApplication.processEvents()
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"wrote {path}")


def main() -> int:
    """Drive the three widgets and save one screenshot each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/screenshots")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps for the screenshot run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    viewer = napari.Viewer(title="napari-graphkd")
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open_sample("napari-graphkd", "bbbc039_A15_s5")
    image_layer, truth = viewer.layers[0], viewer.layers[1]
    truth.visible = False

    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment (teacher vs student)", area="right")
    segment.ground_truth.value = truth
    segment.run(("teacher", "student"))
    wait(segment)
    viewer.layers.remove(truth)  # the grid shows image | teacher | student side by side
    viewer.grid.enabled = True
    viewer.grid.shape = (1, 3)
    viewer.reset_view()
    shoot(viewer, out / "segment.png")
    viewer.layers.insert(1, truth)

    viewer.grid.enabled = False
    results = [layer for layer in viewer.layers if layer is not truth and layer is not image_layer]
    overlays = OverlaysWidget(viewer)
    viewer.window.add_dock_widget(overlays, name="Graph & affinity overlays", area="right", tabify=True)
    overlays.result.value = results[0]
    overlays.other.value = results[1]
    for make in (overlays.affinity_map, overlays.instance_graph, overlays.disagreement):
        make()
        wait(overlays)
    def show_only(*names: str) -> None:
        for layer in viewer.layers:
            layer.visible = layer is image_layer or any(n in layer.name for n in names)

    viewer.reset_view()
    show_only("graph nodes", "graph edges")
    shoot(viewer, out / "overlays_graph.png")
    show_only("affinity disagreement", "graph disagreement")
    shoot(viewer, out / "overlays_disagreement.png")

    for layer in list(viewer.layers):
        layer.visible = layer is image_layer
    viewer.reset_view()
    painted = np.zeros_like(truth.data)
    ids = [i for i in np.unique(truth.data[150:350, 200:450]) if i][:15]
    for i in ids:
        painted[truth.data == i] = i
    viewer.add_labels(painted, name="my corrections")
    finetune = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(finetune, name="Fine-tune / distil", area="right", tabify=True)
    row = list(finetune.rows)[0]
    row.image.value = image_layer
    row.painted.value = viewer.layers["my corrections"]
    finetune.steps.value = args.steps
    finetune.folder.value = tempfile.mkdtemp(prefix="graphkd-shots-")
    finetune.start()
    started = time.time()
    while finetune.busy and time.time() - started < 20:
        QApplication.processEvents()
        time.sleep(0.02)
    shoot(viewer, out / "finetune_running.png")
    wait(finetune)
    shoot(viewer, out / "finetune_done.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
