"""Open napari with a bundled sample, the bundled models and the plugin's widgets docked."""
from __future__ import annotations

import napari

from ..sample_data import SAMPLE_NAMES
from . import FinetuneWidget, OverlaysWidget, SegmentWidget


def open_demo_viewer(sample: str = SAMPLE_NAMES[1], run: bool = True) -> napari.Viewer:
    """A viewer showing ``sample`` (ground truth hidden), the widgets in one tab group, and both models side by side."""
    viewer = napari.Viewer(title="napari-graphkd demo")
    viewer.open_sample("napari-graphkd", sample)
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment (teacher vs student)", area="right")
    viewer.window.add_dock_widget(OverlaysWidget(viewer), name="Graph and affinity overlays", area="right", tabify=True)
    viewer.window.add_dock_widget(FinetuneWidget(viewer), name="Fine-tune / distil", area="right", tabify=True)
    if run:
        segment.run(("teacher", "student"))
    return viewer
