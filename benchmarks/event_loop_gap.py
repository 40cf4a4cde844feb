"""Does the viewer stay responsive while the widgets work? Largest gap between 20 ms timer ticks.

Opens a real napari viewer (under Xvfb when there is no display) and records a 20 ms QTimer,
first with the viewer idle, then while a job runs. Prints max / p95 / median gaps as a table.

* ``--scenario finetune``: a bundled BBBC039 sample with a partial annotation (the cells left of
  the image's middle are painted) and a real fine-tune started with the Fine-tune / distil widget.
* ``--scenario segment``: a ``--size`` x ``--size`` image (bundled samples tiled) segmented with
  the Segment widget, decoding in the worker process (the widgets' default for large images,
  decode/process.py) and then in the viewer's own process, where mwatershed holds the GIL.

    python benchmarks/event_loop_gap.py                                   # fine-tune, bundled teacher and student
    python benchmarks/event_loop_gap.py --teacher t.safetensors --student s.safetensors --steps 60
    python benchmarks/event_loop_gap.py --scenario segment --size 2000 --models student teacher
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


def tiled_image(size: int) -> np.ndarray:
    """A size x size uint16 image made of the bundled samples, side by side and mirrored (no seams)."""
    planes = [load_sample(name)[0] for name in SAMPLE_NAMES]
    row = np.concatenate([p if i % 2 == 0 else p[:, ::-1] for i, p in enumerate(planes)], axis=1)
    reps = (-(-size // row.shape[0]), -(-size // row.shape[1]))
    return np.tile(np.concatenate([row, row[::-1]], axis=0), reps)[:size, :size].copy()


def segment_scenario(args: argparse.Namespace) -> int:
    """Gaps while the Segment widget segments a large image, decoding in the worker vs in the viewer's process."""
    import napari

    from napari_graphkd._widgets import SegmentWidget
    from napari_graphkd.decode import process

    image = tiled_image(args.size)
    viewer = napari.Viewer(show=True)
    viewer.add_image(image, name=f"tiled {args.size}")
    widget = SegmentWidget(viewer)  # starts the decoder worker process
    viewer.window.add_dock_widget(widget, name="Segment")
    for role in ("teacher", "student"):
        widget.pickers[role].source.value = "file"
        widget.pickers[role].path.value = getattr(args, role)
    widget.image.value = viewer.layers[f"tiled {args.size}"]
    process.prewarm().result()  # the worker is ready, as it is a few seconds after the widget opens
    rows = []
    idle_end = time.perf_counter() + 3.0
    rows.append(row("idle (3 s)", record_gaps(lambda: time.perf_counter() > idle_end)))
    for model in args.models:
        for in_worker in (True, False):
            process.offload_large_decodes(in_worker)
            start = time.perf_counter()
            if widget.run((model,)) is None:
                print("the segmentation did not start (see the notification above)", file=sys.stderr)
                return 1
            gaps = record_gaps(lambda: not widget.busy)
            seconds = time.perf_counter() - start
            result = widget.last_result.models[0]
            where = "worker process" if in_worker else "viewer's process"
            rows.append(row(f"{model}, decoding in the {where} ({seconds:.1f} s: network {result.network_seconds:.1f} s, "
                            f"decode {result.decode_seconds:.1f} s)", gaps))
    viewer.close()
    process.shutdown()
    print(f"segmenting a {args.size}x{args.size} image with the Segment widget")
    print(f"| viewer | ticks of {TICK_MS} ms | max gap (ms) | p95 gap (ms) | median gap (ms) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Measure idle and busy event-loop gaps in a real viewer; print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="finetune", choices=["finetune", "segment"])
    p.add_argument("--teacher", default=str(bundled_path("teacher")))
    p.add_argument("--student", default=str(bundled_path("student")))
    p.add_argument("--mode", default="finetune", choices=list(MODES))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sample", default="bbbc039_A15_s5", choices=SAMPLE_NAMES)
    p.add_argument("--size", type=int, default=2000, help="segment scenario: image side (px)")
    p.add_argument("--models", nargs="+", default=["student"], choices=["student", "teacher"],
                   help="segment scenario: models to run")
    args = p.parse_args(argv)
    for role in ("teacher", "student"):
        if not Path(getattr(args, role)).is_file():
            print(f"no {role} checkpoint at {getattr(args, role)}; pass --{role} PATH", file=sys.stderr)
            return 2
    ensure_display()
    if args.scenario == "segment":
        return segment_scenario(args)
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
