"""A volume segmented by a 3D model in the Segment widget, shown in napari's 3D view (remakes the README's 3D screenshot).

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python scripts/volume_screenshot.py \
        --data DATA --model RUN/best.safetensors [--out docs/screenshots/volume_3d.png]

It opens the test slab of ``nuclei3d_lightsheet`` from the data folder given with ``--data`` (the
bundled volume split), with its voxel size as the layer scale, opens the Segment widget from the
Plugins menu, picks the 3D checkpoint as the teacher and presses Teacher, as a user does. Then it
turns on the 3D view (``viewer.dims.ndisplay = 3``), tilts the camera, and saves the canvas.
Without ``--model`` it shows the slab's ground-truth labels instead (and says so in the layer name).
An existing output is kept unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_graphkd.io.volumes import load_slab

PLUGIN = "napari-graphkd"
SCREEN = (1280, 800)
CAMERA_ANGLES = (-15.0, 35.0, 145.0)  # a view from above and to the side: depth shows in the rendering


def settle(rounds: int = 30) -> None:
    """Process Qt events for a moment (layouts, repaints)."""
    for _ in range(rounds):
        QApplication.processEvents()
        time.sleep(0.01)


def wait(widget, timeout: float = 1800.0) -> None:
    """Process Qt events until the widget's background job has finished."""
    start = time.time()
    while widget.busy:
        QApplication.processEvents()
        time.sleep(0.05)
        if time.time() - start > timeout:
            raise TimeoutError("the Segment widget's job did not finish")
    settle()


def main() -> int:
    """Segment (or show) the test slab in 3D and save a canvas screenshot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="data folder holding nuclei3d_lightsheet/images and labels")
    parser.add_argument("--model", default=None, help="3D checkpoint to segment with (default: show the ground truth)")
    parser.add_argument("--part", default="test", choices=["train", "tune", "test"], help="slab of the volume split")
    parser.add_argument("--out", default="docs/screenshots/volume_3d.png")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing screenshot")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"volume_screenshot: error: {out} exists (--overwrite to replace it)", file=sys.stderr)
        return 2
    slab = load_slab(args.data, "nuclei3d_lightsheet", args.part)

    viewer = napari.Viewer(title="napari-graphkd")
    viewer.window._qt_window.resize(*SCREEN)
    viewer.window._qt_window.move(0, 0)
    image = viewer.add_image(slab.image, name=slab.name, scale=slab.voxel_size, rendering="attenuated_mip",
                             colormap="gray")
    if args.model:
        _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment (teacher vs student)")
        settle()
        segment.image.value = image
        segment.pickers["teacher"].source.value = "file"
        segment.pickers["teacher"].path.value = args.model
        segment.run(("teacher",))
        wait(segment)
        print(segment.report.value)
        viewer.window.remove_dock_widget("all")
    else:
        viewer.add_labels(slab.labels, name=f"{slab.name} ground truth", scale=slab.voxel_size)
    viewer.layers[-1].opacity = 0.6
    viewer.dims.ndisplay = 3
    viewer.reset_view()
    viewer.camera.angles = CAMERA_ANGLES
    settle(60)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        viewer.screenshot(partial, canvas_only=True, flash=False)
        os.chmod(partial, 0o644)  # mkstemp makes it private; a picture for the docs is readable by all
        os.replace(partial, out)
    finally:
        Path(partial).unlink(missing_ok=True)
    print(f"wrote {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
