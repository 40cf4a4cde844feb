"""Screenshots of each widget in action, from a real napari viewer at 1280 x 800 (Xvfb on a headless machine).

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

The script only does what a user does: open the bundled sample, open the three widgets from the
Plugins menu, pick the ground truth, press buttons, untick a checkbox, click a dock's tab, scroll it, and paint
a few nuclei (copied from the ground truth) into a new Labels layer. Every arrangement of the view
(grid, hidden ground truth, tab group, fitted view) is the widgets' own.
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

from napari_graphkd._widgets._layout import dock_of

PLUGIN = "napari-graphkd"
SCREEN = (1280, 800)


def settle(rounds: int = 30) -> None:
    """Process Qt events for a moment (layouts, repaints)."""
    for _ in range(rounds):
        QApplication.processEvents()
        time.sleep(0.01)


def wait(widget, timeout: float = 1200.0) -> None:
    """Process Qt events until the widget's background job has finished."""
    start = time.time()
    while widget.busy:
        QApplication.processEvents()
        time.sleep(0.02)
        if time.time() - start > timeout:
            raise TimeoutError("widget job did not finish")
    settle()


def click_tab(widget) -> None:
    """Bring a widget's dock tab to the front, as a click on its tab does."""
    dock_of(widget).raise_()
    settle()


def scroll_to_bottom(widget) -> None:
    """Scroll a widget's dock to its end (progress, report, loss curve), as the user does with the scroll bar."""
    bar = dock_of(widget).widget().verticalScrollBar()
    bar.setValue(bar.maximum())
    settle()


def shoot(viewer: napari.Viewer, path: Path) -> None:
    """Screenshot of the whole window (canvas and docked widgets)."""
    settle()
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
    viewer.window._qt_window.resize(*SCREEN)
    viewer.window._qt_window.move(0, 0)
    viewer.open_sample(PLUGIN, "bbbc039_A15_s5")
    image_layer, truth = viewer.layers[0], viewer.layers[1]
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment (teacher vs student)")
    _, overlays = viewer.window.add_plugin_dock_widget(PLUGIN, "Graph and affinity overlays")
    _, finetune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune / distil")
    settle()
    viewer.window._qt_window.resize(*SCREEN)

    click_tab(segment)
    segment.ground_truth.value = truth
    segment.run(("teacher", "student"))
    wait(segment)
    shoot(viewer, out / "segment.png")

    segment.side_by_side.value = False  # back to the single view to draw overlays on the image
    click_tab(overlays)
    overlays.instance_graph()
    wait(overlays)
    shoot(viewer, out / "overlays_graph.png")
    overlays.disagreement()
    wait(overlays)
    shoot(viewer, out / "overlays_disagreement.png")

    painted = np.zeros_like(truth.data)  # the user paints 15 nuclei (here: copied from the ground truth)
    for i in [i for i in np.unique(truth.data[150:350, 200:450]) if i][:15]:
        painted[truth.data == i] = i
    viewer.add_labels(painted, name="my corrections")
    click_tab(finetune)
    finetune.rows[0].image.value = image_layer
    finetune.steps.value = args.steps
    finetune.folder.value = tempfile.mkdtemp(prefix="graphkd-shots-")
    finetune.start()
    scroll_to_bottom(finetune)
    started = time.time()
    while finetune.busy and time.time() - started < 20:
        QApplication.processEvents()
        time.sleep(0.02)
    shoot(viewer, out / "finetune_running.png")
    wait(finetune)
    scroll_to_bottom(finetune)
    shoot(viewer, out / "finetune_done.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
