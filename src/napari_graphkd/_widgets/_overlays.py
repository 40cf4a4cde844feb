"""The "Graph and affinity overlays" widget: what the networks see, on top of their results."""
from __future__ import annotations

import napari  # noqa: F401 - the viewer annotation
import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, PushButton, SpinBox
from napari.layers import Labels
from napari.utils.colormaps import ensure_colormap
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QHBoxLayout, QLabel, QVBoxLayout, QWidget

from ..affinity import OFFSETS
from ..io.checkpoint import CheckpointError
from ..preprocess import InputError
from ..segment import RunSettings
from ._base import JobWidget
from ._jobs import JobResult, OverlayRequest, Source, offset_name, overlay_job
from ._layers import current_plane, find_layer, placement, plane_data, provenance
from ._layout import wrap
from ._state import MODELS

LEGENDS = (("graph edges: cosine similarity of the two nuclei's embeddings", "viridis", "-1 unlike", "+1 alike"),
           ("teacher vs student: disagreement", "inferno", "0 agree", "1 differ"))


def colour_bar(title: str, colormap: str, low: str, high: str) -> QWidget:
    """A small legend: title, then ``low`` | gradient of the colormap | ``high``."""
    colours = ensure_colormap(colormap).map(np.linspace(0.0, 1.0, 6))
    stops = ", ".join(f"stop:{i / 5:.1f} rgb({int(255 * r)},{int(255 * g)},{int(255 * b)})" for i, (r, g, b, _) in enumerate(colours))
    bar = QLabel()
    bar.setFixedHeight(10)
    bar.setMinimumWidth(60)
    bar.setStyleSheet(f"background: qlineargradient(x1:0, y1:0, x2:1, y2:0, {stops});")
    box = QWidget()
    outer = QVBoxLayout(box)
    outer.setContentsMargins(0, 0, 0, 0)
    caption = QLabel(title)
    wrap(caption)
    outer.addWidget(caption)
    row = QHBoxLayout()
    for widget in (QLabel(low), bar, QLabel(high)):
        row.addWidget(widget)
    row.setStretch(1, 1)
    outer.addLayout(row)
    return box


class OverlaysWidget(JobWidget):
    """Affinity maps, instance graphs and teacher-vs-student disagreement of Segment widget results.

    Overlays use the network outputs cached by the Segment widget (or re-run the network once),
    for the plane of the result the viewer shows (a 3D model's result: the whole volume, its graph
    with (z, y, x) nodes and its affinities with z offsets); every overlay is a new layer of the
    result's own dimensionality (the affinity map shows one offset, chosen here, additive and
    semi-transparent).
    """

    def __init__(self, viewer: napari.viewer.Viewer):  # napari injects the viewer (matched by this annotation)
        super().__init__(viewer, labels=True)
        self.last_result: JobResult | None = None
        self._known: set = set()  # ids of the layers seen so far (results not among them are new)
        self.result = ComboBox(label="Result", choices=self._result_choices,
                               tooltip="A teacher or student result of the Segment widget (the newest is chosen "
                                       "when it appears)")
        self.other = ComboBox(label="Compare with", choices=self._result_choices, nullable=True, value=None,
                              tooltip="The second result for 'Teacher vs student' (same image and plane)")
        self.offset = ComboBox(label="Affinity offset", choices=self._offset_choices, value=0,
                               tooltip="Which neighbour the affinity map compares each pixel with (3D models: also "
                                       "voxels in other planes)")
        self.k = SpinBox(label="Neighbours (k)", value=4, min=1, max=16, tooltip="Graph edges per nucleus")
        self.max_distance = FloatSpinBox(label="Longest edge (px)", value=80.0, min=0.0, max=100000.0, step=5.0,
                                         tooltip="0 = any length")
        actions = {"Affinity map": self.affinity_map, "Instance graph": self.instance_graph,
                   "Teacher vs student": self.disagreement}
        buttons = []
        for text, action in actions.items():
            buttons.append(PushButton(text=text))
            buttons[-1].changed.connect(lambda _=None, action=action: action())
        self.extend([self.result, self.other, self.offset, self.k, self.max_distance,
                     Container(widgets=buttons[:2], layout="horizontal", labels=False),
                     Container(widgets=buttons[2:], layout="horizontal", labels=False), *self.footer()])
        self.result.changed.connect(lambda _=None: self.offset.reset_choices())
        self.legends = [colour_bar(*legend) for legend in LEGENDS]
        for legend in self.legends:
            self.native.layout().addWidget(legend)
        self.actions = buttons
        self.finish_layout()
        self._pick_newest()

    def _result_choices(self, widget=None) -> list:
        layers = [layer for layer in self.viewer.layers
                  if isinstance(layer, Labels) and provenance(layer).get("model_spec") not in (None, "classical")]
        return [(layer.name, layer) for layer in layers]

    def _offset_choices(self, widget=None) -> list:
        """The affinity offsets of the chosen result's model (2D: OFFSETS; a 3D model: its (z, y, x) offsets)."""
        offsets = OFFSETS
        layer = self.result.value if hasattr(self, "result") else None
        if layer is not None:
            try:
                offsets = getattr(MODELS.get(provenance(layer)["model_spec"])[1], "offsets", None) or OFFSETS
            except (CheckpointError, KeyError):  # the model file is gone: the overlay will say so when asked
                pass
        return [(offset_name(offset), i) for i, offset in enumerate(offsets)]

    def _layers_changed(self, event=None) -> None:
        super()._layers_changed(event)
        try:
            self._pick_newest()
        except RuntimeError:  # the Qt widget is already deleted (viewer closing)
            pass

    def _pick_newest(self) -> None:
        """When new results appear, choose the newest, and its teacher/student counterpart to compare with."""
        known, self._known = self._known, {id(layer) for layer in self.viewer.layers}
        new = [layer for _, layer in self._result_choices() if id(layer) not in known]
        if not new:
            return
        newest = provenance(new[-1])
        pair: dict = {}  # the newest teacher and student results of the same image and planes
        for _, layer in reversed(self._result_choices()):  # newest first
            prov = provenance(layer)
            if (prov.get("image_layer_id"), prov.get("planes")) == (newest.get("image_layer_id"), newest.get("planes")):
                pair.setdefault(prov.get("role"), layer)
        self.result.value = pair.get("teacher", new[-1])
        if "teacher" in pair and "student" in pair:
            self.other.value = pair["student"]

    def affinity_map(self):
        """Add the result's affinity map at the chosen offset; returns the worker or None."""
        return self._overlay("affinity")

    def instance_graph(self):
        """Add the result's instance graph (nodes and similarity-coloured edges); returns the worker or None."""
        return self._overlay("graph")

    def disagreement(self):
        """Add where the two results' networks disagree (affinities and graph edges); returns the worker or None."""
        return self._overlay("disagreement")

    def _overlay(self, kind: str):
        try:
            request = self._request(kind)
        except InputError as exc:
            show_error(f"napari-graphkd: {exc}")
            return None
        return self._start(overlay_job, request, self._show)

    def _source(self, layer: Labels) -> tuple[Source, int | None]:
        """The result's labels on the plane the viewer shows, and that plane's index in the layer."""
        prov = provenance(layer)
        image = find_layer(self.viewer, prov["image_layer_id"])
        if image is None:
            raise InputError(f"the image {prov['image_layer']!r} that {layer.name!r} was made from is no longer open")
        volume = bool(prov.get("volume"))
        local = None if layer.ndim == 2 or (volume and layer.ndim == 3) else current_plane(self.viewer, layer)
        image_plane = local if volume else prov["planes"][local or 0]  # a series of volumes: the time point shown
        source = Source(layer.name, plane_data(layer.data, local), prov["image_layer_id"], image.data, image_plane,
                        prov["model_spec"], prov["model"], RunSettings(**prov["run"]))
        return source, local

    def _request(self, kind: str) -> OverlayRequest:
        layer = self.result.value
        if layer is None:
            raise InputError("choose a teacher or student result of the Segment widget")
        source, local = self._source(layer)
        other = None
        if kind == "disagreement":
            if self.other.value is None or self.other.value is layer:
                raise InputError("choose a second result (the student) to compare with")
            other, _ = self._source(self.other.value)
            if (other.image_id, other.image_plane, other.labels.shape) != (source.image_id, source.image_plane, source.labels.shape):
                raise InputError("the two results must come from the same image (and plane)")
        stacked = layer.ndim == (4 if provenance(layer).get("volume") else 3)
        return OverlayRequest(kind, source, other, placement(layer, [local]), stacked, int(self.k.value),
                              self.max_distance.value or None, int(self.offset.value))

    def _show(self, result: JobResult) -> None:
        request = result.request
        if find_layer(self.viewer, request.source.image_id) is None:
            self.report.value = ""
            return  # the image was closed meanwhile: nothing to draw on
        lines = []
        for data, kwargs, kind in result.layers:
            layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
            count = {"points": " nodes", "vectors": " edges"}.get(kind)
            lines.append(f"added {layer.name!r}" + (f" ({len(layer.data)}{count})" if count else ""))
        self.last_result = result
        self.report.value = "\n".join(lines)
