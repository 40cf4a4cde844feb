"""The "Graph & affinity overlays" widget: what the networks see, on top of their results."""
from __future__ import annotations

import napari  # noqa: F401 - the viewer annotation
from magicgui.widgets import ComboBox, Container, FloatSpinBox, PushButton, SpinBox
from napari.layers import Labels
from napari.utils.notifications import show_error

from ..preprocess import InputError
from ._base import JobWidget
from ..segment import RunSettings
from ._jobs import JobResult, OverlayRequest, Source, overlay_job
from ._layers import current_plane, find_layer, placement, plane_data, provenance


class OverlaysWidget(JobWidget):
    """Affinity maps, instance graphs and teacher-vs-student disagreement of Segment widget results.

    Overlays use the network outputs cached by the Segment widget (or re-run the network once),
    for the plane of the result the viewer shows; every overlay is a new layer.
    """

    def __init__(self, viewer: napari.viewer.Viewer):  # napari injects the viewer (matched by this annotation)
        super().__init__(viewer, labels=True)
        self.last_result: JobResult | None = None
        self.result = ComboBox(label="Result (teacher)", choices=self._result_choices)
        self.other = ComboBox(label="Compare with (student)", choices=self._result_choices, nullable=True, value=None)
        self.k = SpinBox(label="Neighbours per nucleus (k)", value=4, min=1, max=16)
        self.max_distance = FloatSpinBox(label="Longest edge (px, 0 = any)", value=80.0, min=0.0, max=100000.0, step=5.0)
        actions = {"Affinity map": self.affinity_map, "Instance graph": self.instance_graph,
                   "Teacher vs student": self.disagreement}
        buttons = []
        for text, action in actions.items():
            buttons.append(PushButton(text=text))
            buttons[-1].changed.connect(lambda _=None, action=action: action())
        self.extend([self.result, self.other, self.k, self.max_distance,
                     Container(widgets=buttons, layout="horizontal", labels=False), *self.footer()])
        self.actions = buttons

    def _result_choices(self, widget=None) -> list:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Labels) and provenance(layer).get("model_spec") not in (None, "classical")]

    def affinity_map(self):
        """Add the result's affinity map (one channel per offset); returns the worker or None."""
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
        local = None if layer.ndim == 2 else current_plane(self.viewer, layer)
        image_plane = prov["planes"][local or 0]
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
        return OverlayRequest(kind, source, other, placement(layer, [local]), layer.ndim == 3, int(self.k.value),
                              self.max_distance.value or None)

    def _show(self, result: JobResult) -> None:
        lines = []
        for data, kwargs, kind in result.layers:
            layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
            count = {"points": " nodes", "vectors": " edges"}.get(kind)
            lines.append(f"added {layer.name!r}" + (f" ({len(layer.data)}{count})" if count else ""))
        self.last_result = result
        self.report.value = "\n".join(lines)
