"""Does the viewer stay responsive while the Fine-tune / distil widget trains? Largest gap between 20 ms timer ticks.

Opens a real napari viewer (under Xvfb when there is no display), loads a bundled BBBC039 sample
with a partial annotation (the cells left of the image's middle are painted), starts a real
fine-tune with the widget and records a 20 ms QTimer: first with the viewer idle, then while the
job runs. Prints max / p95 / median gaps as a table.

    python benchmarks/event_loop_gap.py                                   # bundled teacher and student
    python benchmarks/event_loop_gap.py --teacher t.safetensors --student s.safetensors --steps 60
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample
from napari_graphkd.segment import bundled_path
from napari_graphkd.train.finetune import MODES
from provenance import header

TICK_MS = 20


def ensure_display() -> None:
    """Start a virtual X server (Xvfb via PyVirtualDisplay) when there is no display."""
    if os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM"):
        return
    from pyvirtualdisplay import Display  # installed with pytest-xvfb (the testing extra)

    Display(visible=False, size=(1600, 1000)).start()


def record_gaps(until: Callable[[], bool]) -> np.ndarray:
    """Gaps (s) between ticks of a 20 ms QTimer while the event loop runs until ``until()`` is true."""
    from qtpy.QtCore import QEventLoop, QTimer

    ticks: list[float] = []
    loop = QEventLoop()
    tick, check = QTimer(), QTimer()
    tick.timeout.connect(lambda: ticks.append(time.perf_counter()))
    check.timeout.connect(lambda: until() and loop.quit())
    tick.start(TICK_MS)
    check.start(50)
    loop.exec()
    tick.stop()
    check.stop()
    return np.diff(ticks)


def partial_annotation(labels: np.ndarray) -> np.ndarray:
    """The cells whose centroid lies in the left half of the image; the rest is left unpainted."""
    ids = np.unique(labels[labels > 0])
    cols = np.array([np.nonzero(labels == i)[1].mean() for i in ids])
    return np.where(np.isin(labels, ids[cols < labels.shape[1] / 2]), labels, 0).astype(np.int32)


def row(name: str, gaps: np.ndarray) -> str:
    """One markdown table row of gap statistics in ms."""
    ms = 1000 * gaps
    return f"| {name} | {len(gaps) + 1} | {ms.max():.0f} | {np.percentile(ms, 95):.0f} | {np.median(ms):.0f} |"


def main(argv: list[str] | None = None) -> int:
    """Measure idle and fine-tuning event-loop gaps in a real viewer; print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(bundled_path("teacher")))
    p.add_argument("--student", default=str(bundled_path("student")))
    p.add_argument("--mode", default="finetune", choices=list(MODES))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sample", default="bbbc039_A15_s5", choices=SAMPLE_NAMES)
    args = p.parse_args(argv)
    for role in ("teacher", "student"):
        if not Path(getattr(args, role)).is_file():
            print(f"no {role} checkpoint at {getattr(args, role)}; pass --{role} PATH", file=sys.stderr)
            return 2
    ensure_display()
    import napari

    from napari_graphkd._widgets import FinetuneWidget

    image, labels = load_sample(args.sample)
    viewer = napari.Viewer(show=True)
    viewer.add_image(image, name=args.sample)
    viewer.add_labels(partial_annotation(labels), name="painted cells")
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune / distil")
    for role in ("teacher", "student"):
        widget.pickers[role].source.value = "file"
        widget.pickers[role].path.value = getattr(args, role)
    widget.rows[0].image.value = viewer.layers[args.sample]
    widget.rows[0].painted.value = viewer.layers["painted cells"]
    widget.mode.value, widget.steps.value = args.mode, args.steps
    with tempfile.TemporaryDirectory(prefix="graphkd-gap-") as folder:
        widget.folder.value = folder
        idle_end = time.perf_counter() + 3.0
        idle = record_gaps(lambda: time.perf_counter() > idle_end)
        start = time.perf_counter()
        if widget.start() is None:
            print("the fine-tune did not start (see the notification above)", file=sys.stderr)
            return 1
        busy = record_gaps(lambda: not widget.busy)
        seconds = time.perf_counter() - start
        saved = widget.last_result.saved if widget.last_result else {}
    viewer.close()
    print(header() + "\n")
    print(f"{args.sample} ({image.shape[0]}x{image.shape[1]}), {args.mode}, {args.steps} steps in {seconds:.1f} s, "
          f"saved {', '.join(p.name for p in saved.values()) or 'nothing'}")
    print(f"| viewer | ticks of {TICK_MS} ms | max gap (ms) | p95 gap (ms) | median gap (ms) |")
    print("|---|---|---|---|---|")
    print(row("idle (3 s)", idle))
    print(row(f"fine-tuning ({args.mode})", busy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
