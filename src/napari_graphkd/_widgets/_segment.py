"""The "Segment (teacher vs student)" widget: run models on an image layer into new Labels layers."""
from __future__ import annotations

import tempfile
import uuid
from dataclasses import asdict, replace
from datetime import datetime

import napari  # noqa: F401 - the viewer annotation
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning

from ..decode.mws import DecodeSettings
from ..inference import DEFAULT_TILE
from ..io.checkpoint import CheckpointError
from ..large.chunks import DEFAULT_CHUNK
from ..large.view import full_resolution, view_box, wants_chunked
from ..preprocess import InputError
from ._base import JobWidget
from ..preprocess import AUTO, CHANNEL_MODES
from ..segment import RunSettings
from ._jobs import JobResult, LargeRequest, ModelResult, SegmentRequest, large_job, segment_job
from ._layers import CREATED_BY, KEY, Placement, check_image_layer, find_layer, placement, planes_to_run, provenance
from ._layout import collapsible
from ._models import ModelPicker
from ._state import MODELS

DECODER_FIELDS = ("min_size", "foreground_threshold", "attractive_bias")


def _mark_edited(event) -> None:
    """A result layer painted by hand is the user's now: never re-decode or replace it."""
    provenance(event.source)["edited"] = True


class SegmentWidget(JobWidget):
    """Teacher and student (and a classical baseline) side by side on one image layer.

    A 3D model segments a (Z,Y,X) layer as one volume (ids span planes), the layer's scale
    giving the voxel size; 2D models segment planes.

    Each result is a Labels layer named by image, model and input settings; running the same model
    with the same settings again updates that layer (never one painted by hand or made by the user).
    Network outputs are cached so decoder changes re-decode the last run at once.
    """

    def __init__(self, viewer: napari.viewer.Viewer):  # napari injects the viewer (matched by this annotation)
        super().__init__(viewer, labels=True)
        self._uid = uuid.uuid4().hex
        self._last_request: SegmentRequest | None = None
        self._latest: dict = {}  # role -> result layer of the last run
        self._redecode_pending = False
        self._syncing = False
        self._saved_view: dict | None = None  # the user's grid settings and the visibility we changed, to restore
        self.last_result: JobResult | None = None
        self._store: str | None = None  # folder of this widget's chunked results (Zarr stores the layers read)

        self.image = ComboBox(label="Image", choices=self._image_choices)
        self.ground_truth = ComboBox(label="Ground truth", choices=self._labels_choices, nullable=True, value=None,
                                     tooltip="Optional Labels layer to score the results against (F1, AJI)")
        self.pickers = {"teacher": ModelPicker("teacher", "teacher"), "student": ModelPicker("student", "student")}
        self.diameter = FloatSpinBox(label="Diameter (px)", value=0.0, min=0.0, max=1000.0, step=1.0,
                                     tooltip="Typical nucleus diameter in this image; 0 = estimated automatically")
        self.diameter.native.setSpecialValueText("auto")  # the spin box shows "auto" at 0
        self.invert = ComboBox(label="Nuclei", value=AUTO, choices=[("auto-detect", AUTO), ("bright on dark", False),
                                                                    ("dark on bright", True)],
                               tooltip="Dark on bright (e.g. bright-field) is inverted so nuclei are bright, as in training")
        self.channel = ComboBox(label="Input channel", value=AUTO, choices=[AUTO, *CHANNEL_MODES],
                                tooltip="Grey level used: luminance, or hematoxylin of stained RGB images")
        self.all_planes = CheckBox(text="All planes of a stack", tooltip="Unticked: only the plane the viewer shows")
        self.field_of_view = CheckBox(text="Field of view only", tooltip="Segment only the part of the image on screen "
                                      "(a quick look at a large image); the labels overlay it in place")
        self.side_by_side = CheckBox(text="Show teacher and student side by side", value=True,
                                     tooltip="After 'Run both', napari's grid shows image | teacher | student "
                                             "(ground truth hidden); untick to restore your previous view")
        self.chunk = SpinBox(label="Chunk (px)", value=DEFAULT_CHUNK, min=128, max=8192, step=128,
                             tooltip="Lazy (Dask, Zarr, multiscale) or very large images run chunk by chunk into a "
                                     "Zarr store on disk; chunk size without the halo")
        self.tile = SpinBox(label="Tile (px)", value=DEFAULT_TILE, min=128, max=8192, step=128,
                            tooltip="Large images run in overlapping tiles of this size (memory vs. speed)")
        self.own_settings = CheckBox(text="Each model's tuned settings", value=True,
                                     tooltip="Untick to decode with the values below (re-decodes at once)")
        defaults = DecodeSettings()
        self.min_size = SpinBox(label="Min fragment (px)", value=defaults.min_size, min=0, max=100000)
        self.foreground_threshold = FloatSpinBox(label="Foreground thr.", value=defaults.foreground_threshold,
                                                 min=0.0, max=1.0, step=0.05)
        self.attractive_bias = FloatSpinBox(label="Attractive bias", value=defaults.attractive_bias, min=-1.0, max=1.0,
                                            step=0.05)
        buttons = {"Teacher": ("teacher",), "Student": ("student",), "Run both": ("teacher", "student"),
                   "Classical": ("classical",)}
        self.buttons = {}
        for text, roles in buttons.items():
            self.buttons[text] = PushButton(text=text)
            self.buttons[text].changed.connect(lambda _=None, roles=roles: self.run(roles))
        self.buttons["Classical"].tooltip = "Otsu + watershed baseline (what a CellProfiler pipeline does)"
        self.actions = list(self.buttons.values())

        self.advanced = Container(widgets=[self.tile, self.chunk, self.own_settings, self.min_size, self.foreground_threshold,
                                           self.attractive_bias], labels=True)
        self.extend([self.image, self.ground_truth, *self.pickers.values(), self.diameter, self.invert, self.channel,
                     self.all_planes, self.field_of_view, self.side_by_side,
                     Container(widgets=list(self.buttons.values()), layout="horizontal", labels=False),
                     *self.footer()])
        self.advanced_section = collapsible("Advanced: tiles and decoder", self.advanced)
        self.native.layout().insertWidget(self.index(self.side_by_side) + 1, self.advanced_section)
        self.finish_layout()
        for picker in self.pickers.values():
            picker.source.changed.connect(lambda _=None, p=picker: self._model_changed(p))
            picker.path.changed.connect(lambda _=None, p=picker: self._model_changed(p))
            self._model_changed(picker)
        self.own_settings.changed.connect(self._own_settings_changed)
        for name in DECODER_FIELDS:
            getattr(self, name).changed.connect(self._decoder_changed)
        self.side_by_side.changed.connect(lambda on: None if on else self.restore_view())
        self._own_settings_changed()

    # -- choices -----------------------------------------------------------------------------
    def _image_choices(self, widget=None) -> list:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image) and not provenance(layer)]

    def _labels_choices(self, widget=None) -> list:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Labels)]

    # -- settings ------------------------------------------------------------------------------
    def _model_changed(self, picker: ModelPicker) -> None:
        problem = picker.refresh()
        if problem is not None:
            if not picker.pending:
                show_warning(f"napari-graphkd: {picker.role} model not available: {problem}")
            return
        if picker.role == "teacher" and self.own_settings.value:
            self._show_settings(picker.load().decode_settings)

    def _show_settings(self, settings: DecodeSettings) -> None:
        """Put a model's tuned settings in the (disabled) decoder controls, without re-decoding."""
        self._syncing = True
        try:
            for name in DECODER_FIELDS:
                getattr(self, name).value = getattr(settings, name)
        finally:
            self._syncing = False

    def _own_settings_changed(self, *_) -> None:
        for name in DECODER_FIELDS:
            getattr(self, name).enabled = not self.own_settings.value
        self.redecode()

    def _decoder_changed(self, *_) -> None:
        if not self._syncing and not self.own_settings.value:
            self.redecode()

    def decoder_overrides(self) -> dict | None:
        """Decoder settings from the controls, or None for each model's tuned settings."""
        if self.own_settings.value:
            return None
        return {name: getattr(self, name).value for name in DECODER_FIELDS}

    def run_settings(self) -> RunSettings:
        """Diameter (0 = auto), inversion and input channel (auto or chosen) and tile size."""
        return RunSettings(self.diameter.value or AUTO, self.invert.value, self.channel.value, int(self.tile.value))

    # -- running -------------------------------------------------------------------------------
    def run(self, roles: tuple[str, ...]):
        """Segment the chosen image with ``roles`` (teacher, student, classical); returns the worker or None."""
        try:
            image = self.image.value
            if image is not None and self._volume_run(image, self._models(roles)):
                request = self._request(roles)  # a 3D model: the whole volume, read once (lazy layers too)
            elif image is not None and self.field_of_view.value:
                request, box = self._view_request(roles)
                return self._start(segment_job, request, lambda result: self._show_view(result, box))
            elif image is not None and wants_chunked(image.data):
                return self._start(large_job, self._large_request(roles), self._show_large)
            else:
                request = self._request(roles)
        except (InputError, CheckpointError) as exc:
            show_error(f"napari-graphkd: {exc}")
            return None
        return self._start(segment_job, request, lambda result: self._show(result, self._replaceable(request)))

    def visible_box(self, image: Image) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) full-resolution pixels of a 2D image layer that the canvas shows now."""
        camera = getattr(getattr(self.viewer, "scene", None), "camera", None) or self.viewer.camera  # napari 0.9 moved it
        return view_box(tuple(camera.center)[-2:], float(camera.zoom), tuple(self.viewer.canvas.size),
                        full_resolution(image.data).shape[-2:], tuple(image.scale)[-2:], tuple(image.translate)[-2:])

    def _models(self, roles: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        """(role, spec) of each role, loading each model here so a bad one fails with its reason."""
        models = []
        for role in roles:
            if role == "classical":
                models.append((role, "classical"))
            else:
                self.pickers[role].load()
                models.append((role, self.pickers[role].spec))
        return tuple(models)

    @staticmethod
    def _volume_run(image: Image, models: tuple[tuple[str, str], ...]) -> bool:
        """Whether ``models`` segment ``image`` as one volume (3D models); InputError when 2D and 3D models are mixed
        or a 3D model is given a 2D layer."""
        ndims = {MODELS.get(spec)[1].ndim for _, spec in models}
        if ndims == {2}:
            return False
        if len(ndims) > 1:
            raise InputError("a 3D model segments the whole volume and a 2D model (or the classical pipeline) segments "
                             "planes: run them one at a time")
        if image.ndim not in (3, 4) or image.rgb or image.multiscale:
            raise InputError(f"{image.name!r} is not a (Z,Y,X) volume: the 3D model segments single-scale gray volumes "
                             "(or (T,Z,Y,X) series of them; choose a 2D model for images)")
        return True

    @staticmethod
    def _check_plane(image: Image | None, what: str) -> None:
        """InputError unless ``image`` is a 2D gray layer (single or multiscale)."""
        if image is None:
            raise InputError("choose an Image layer first")
        if image.ndim != 2 or image.rgb:
            raise InputError(f"{what} works on 2D gray images here; {image.name!r} has {image.ndim} dimensions"
                             " (use graphkd segment for stacks)")

    def _view_request(self, roles: tuple[str, ...]) -> tuple[SegmentRequest, tuple[int, int, int, int]]:
        """The visible crop of the image (read from lazy data alone) as an ordinary request placed over it."""
        image = self.image.value
        self._check_plane(image, "segmenting the field of view")
        y0, y1, x0, x1 = box = self.visible_box(image)
        if y1 - y0 < 16 or x1 - x0 < 16:
            raise InputError(f"too little of {image.name!r} is on screen ({y1 - y0}x{x1 - x0} px); pan or zoom to it")
        crop = np.asarray(full_resolution(image.data)[y0:y1, x0:x1])
        base = placement(image, [None])
        translate = (base.translate[0] + y0 * base.scale[0], base.translate[1] + x0 * base.scale[1])
        return SegmentRequest(str(image.unique_id), image.name, crop, (None,), self._models(roles), self.run_settings(),
                              self.decoder_overrides(), True, None, Placement(base.scale, translate)), box

    def _large_request(self, roles: tuple[str, ...]) -> LargeRequest:
        """One network model on a lazy or very large image, chunk by chunk into a new store in the widget's folder."""
        image = self.image.value
        self._check_plane(image, "the chunked path")
        if len(roles) != 1 or roles[0] == "classical":
            raise InputError(f"{image.name!r} is lazy or very large: it runs chunk by chunk with one network model at a "
                             "time; press Teacher or Student (or tick 'Field of view only')")
        (role, spec), = self._models(roles)
        if self._store is None:
            self._store = tempfile.mkdtemp(prefix="napari-graphkd-")
        run = self.run_settings()
        return LargeRequest(str(image.unique_id), image.name, full_resolution(image.data), role, spec,
                            f"{self._store}/{uuid.uuid4().hex}.zarr", int(self.chunk.value),
                            None if run.diameter == AUTO else float(run.diameter),
                            None if run.invert == AUTO else bool(run.invert), int(self.tile.value),
                            self.decoder_overrides(), placement(image, [None]))

    def redecode(self):
        """Re-decode the last run's network outputs with the current decoder settings (no network)."""
        if self._last_request is None:
            return None
        if self.busy:
            self._redecode_pending = True
            return None
        targets = {role: layer for role, layer in self._latest.items() if role != "classical" and layer in self.viewer.layers}
        models = tuple(m for m in self._last_request.models if m[0] in targets)
        if not models:
            return None
        request = replace(self._last_request, models=models, overrides=self.decoder_overrides(), network=False)
        return self._start(segment_job, request, lambda result: self._show(result, targets))

    def _after_job(self) -> None:
        if self._redecode_pending:
            self._redecode_pending = False
            self.redecode()

    def _request(self, roles: tuple[str, ...]) -> SegmentRequest:
        image = self.image.value
        if image is None:
            raise InputError("choose an Image layer first")
        models = self._models(roles)
        run = self.run_settings()
        if self._volume_run(image, models):
            planes: tuple[int | None, ...] = (None,)
            run = replace(run, voxel_size=layer_voxel_size(image))
        else:
            check_image_layer(image)
            planes = tuple(planes_to_run(self.viewer, image, self.all_planes.value))
        gt = self.ground_truth.value
        return SegmentRequest(str(image.unique_id), image.name, image.data, planes, tuple(models), run,
                              self.decoder_overrides(), True, None if gt is None else gt.data,
                              placement(image, list(planes)))

    # -- results -------------------------------------------------------------------------------
    def _owns(self, layer, shape) -> bool:
        """True for a layer napari-graphkd made, still in the viewer, not painted by hand, of this shape."""
        prov = provenance(layer)
        return (layer in self.viewer.layers and prov.get("created_by") == CREATED_BY and not prov.get("edited")
                and layer.data.shape == shape)

    def _replaceable(self, request: SegmentRequest) -> dict:
        """Earlier results of the same image, planes, model and input settings (updated in place, not duplicated)."""
        targets = {}
        for role, spec in request.models:
            for layer in self.viewer.layers:
                prov = provenance(layer)
                if (prov.get("created_by") == CREATED_BY and prov.get("image_layer_id") == request.image_id
                        and prov.get("planes") == list(request.planes) and prov.get("model_spec") == spec
                        and prov.get("requested_run") == asdict(request.run) and not prov.get("edited")):
                    targets[role] = layer
        return targets

    def _provenance(self, request: SegmentRequest, model: ModelResult, result: JobResult) -> dict:
        return {
            "created_by": CREATED_BY, "widget": self._uid, "role": model.role,
            "model": model.name, "model_spec": model.spec, "model_path": model.description.get("path"),
            "architecture": model.description.get("architecture"), "parameters": model.description.get("parameters"),
            "image_layer": request.image_name, "image_layer_id": request.image_id, "planes": list(request.planes),
            "run": asdict(self._resolved(request, model)), "requested_run": asdict(request.run), "inputs": model.inputs,
            "input_rules": None if model.decision is None else model.decision.to_dict(), "objects": model.objects,
            "advice": model.advice, "volume": model.volume,
            "decode": model.decode, "network_seconds": model.network_seconds,
            "network_cached": model.cached, "decode_seconds": model.decode_seconds,
            "ground_truth_scores": model.ground_truth,
            "agreement_with_teacher": result.agreement if model.role == "student" else None,
            "time": datetime.now().isoformat(timespec="seconds"), "edited": False,
        }

    @staticmethod
    def _resolved(request: SegmentRequest, model: ModelResult) -> RunSettings:
        """The run settings the input rules chose for a model (re-running them estimates nothing)."""
        if model.decision is None:
            return (request.runs or {}).get(model.role, request.run)
        return model.decision.run_settings(request.run.tile)

    def _show(self, result: JobResult, targets: dict) -> None:
        request = result.request
        if find_layer(self.viewer, request.image_id) is None:
            show_warning(f"napari-graphkd: the image {request.image_name!r} was closed; its result is discarded")
            self.report.value = ""
            return
        for model in result.models:
            prov = self._provenance(request, model, result)
            layer = targets.get(model.role)
            name = result_name(request.image_name, model)
            if layer is not None and self._owns(layer, model.labels.shape):
                layer.data = model.labels
                provenance(layer).update(prov)
                if request.network:
                    layer.name = name
            else:
                if layer is not None and layer in self.viewer.layers:
                    show_info(f"napari-graphkd: {layer.name!r} was edited by hand; the new result is a new layer")
                layer = self.viewer.add_labels(model.labels, name=name, metadata={KEY: prov}, **request.placement.kwargs())
                layer.events.paint.connect(_mark_edited)
            self._latest[model.role] = layer
        if request.network:  # re-decoding keeps what the input rules chose, so it finds the cached outputs
            self._last_request = replace(request, runs={m.role: self._resolved(request, m) for m in result.models})
        self.last_result = result
        self.report.value = report_text(result)
        advice = sorted({line for model in result.models for line in model.advice})
        if advice and request.network:
            show_warning("napari-graphkd: this image looks unlike the model's training data: " + "; ".join(advice))
        if request.network and {"teacher", "student"} <= {m.role for m in result.models} and self.side_by_side.value:
            self.show_side_by_side()

    def _show_view(self, result: JobResult, box: tuple[int, int, int, int]) -> None:
        """New layers for a field-of-view run, named and marked with the box they cover."""
        self._show(result, {})
        for model in result.models:
            layer = self._latest.get(model.role)
            if layer is not None and layer in self.viewer.layers:
                provenance(layer)["field_of_view"] = list(box)
                layer.name = f"{layer.name} view"

    def _show_large(self, result: JobResult) -> None:
        """A Labels layer reading the chunked run's Zarr store from disk, with provenance."""
        request: LargeRequest = result.request
        if find_layer(self.viewer, request.image_id) is None:
            show_warning(f"napari-graphkd: the image {request.image_name!r} was closed; its result is discarded")
            return
        model = result.models[0]
        prov = {"created_by": CREATED_BY, "widget": self._uid, "role": model.role, "model": model.name,
                "model_spec": model.spec, "model_path": model.description.get("path"),
                "architecture": model.description.get("architecture"), "parameters": model.description.get("parameters"),
                "image_layer": request.image_name, "image_layer_id": request.image_id, "planes": [None],
                "chunked": {"store": request.output, "chunk": request.chunk}, "inputs": model.inputs,
                "objects": model.objects, "decode": model.decode, "network_seconds": model.network_seconds,
                "time": datetime.now().isoformat(timespec="seconds"), "edited": False}
        layer = self.viewer.add_labels(model.labels, name=result_name(request.image_name, model) + " chunked",
                                       metadata={KEY: prov}, **request.placement.kwargs())
        layer.events.paint.connect(_mark_edited)
        self.last_result = result  # not a re-decoding target: the chunked run keeps no network outputs
        self.report.value = report_text(result)

    # -- view ----------------------------------------------------------------------------------
    def show_side_by_side(self) -> None:
        """Grid view: image | teacher | student, with ground truth and older results hidden (restorable)."""
        grid = grid_of(self.viewer)
        shown = {self.image.value, self._latest.get("teacher"), self._latest.get("student")}
        if self._saved_view is None:
            self._saved_view = {"grid": (grid.enabled, tuple(grid.shape), grid.stride), "visible": {}}
        for layer in self.viewer.layers:
            made_here = bool(provenance(layer).get("created_by"))
            if layer not in shown and layer.visible and (made_here or layer is self.ground_truth.value):
                self._saved_view["visible"].setdefault(layer, True)
                layer.visible = False
        for layer in shown:
            if layer is not None:
                layer.visible = True
        grid.stride = 1  # the bottom layer (the image) first, then teacher, then student
        image = self.image.value
        extent = np.ptp(np.asarray(image.extent.world), axis=0)[-2:] if image is not None else (1.0, 1.0)
        canvas = getattr(getattr(self.viewer, "canvas", None), "size", (600, 800))
        grid.shape = grid_shape(tuple(canvas), tuple(extent), len([layer for layer in shown if layer is not None]))
        grid.enabled = True
        self.viewer.reset_view()

    def restore_view(self) -> None:
        """Put back the grid settings and layer visibility the user had before the side-by-side view."""
        saved, self._saved_view = self._saved_view, None
        if saved is None:
            return
        grid = grid_of(self.viewer)
        enabled, shape, stride = saved["grid"]
        grid.stride, grid.shape, grid.enabled = stride, shape, enabled
        for layer, visible in saved["visible"].items():
            if layer in self.viewer.layers:
                layer.visible = visible
        self.viewer.reset_view()

    def use_inputs(self, diameter: float | None, invert: bool | None) -> None:
        """Take over input settings measured elsewhere (e.g. the diameter of the painted cells after fine-tuning)."""
        if diameter:
            self.diameter.value = round(float(diameter), 1)
        if invert is not None:
            self.invert.value = bool(invert)


def layer_voxel_size(image: Image) -> tuple[float, float, float] | None:
    """A volume layer's voxel size (z, y, x) from its scale (the last three axes); None when it is (1, 1, 1): as trained."""
    scale = tuple(float(s) for s in image.scale[-3:])
    return None if scale == (1.0, 1.0, 1.0) else scale


def grid_shape(canvas: tuple[float, float], image: tuple[float, float], n: int) -> tuple[int, int]:
    """(rows, columns) of a grid of ``n`` images of size ``image`` that shows them largest on ``canvas`` (both H, W)."""
    def zoom(rows: int) -> float:
        columns = -(-n // rows)
        return min(canvas[0] / (rows * image[0]), canvas[1] / (columns * image[1]))

    rows = max(range(1, n + 1), key=zoom)
    return rows, -(-n // rows)


def grid_of(viewer):
    """The viewer's grid settings (``viewer.canvas.grid`` since napari 0.9, ``viewer.grid`` before)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def short_name(name: str, limit: int = 24) -> str:
    """``name`` cut in the middle to at most ``limit`` characters."""
    if len(name) <= limit:
        return name
    half = (limit - 1) // 2
    return name[:half] + "…" + name[-(limit - 1 - half):]


def result_name(image_name: str, model: ModelResult) -> str:
    """Short layer name: image, model and what the input rules chose (diameter, inversion)."""
    who = model.role if model.name == model.role else f"{model.role} ({short_name(model.name, 16)})"
    return f"{short_name(image_name)} {who} {model.diameter:.0f}px" + (" inverted" if model.invert else "")


def report_text(result: JobResult) -> str:
    """Per model: objects, what the input rules chose, timings, scores; then student-teacher agreement."""
    lines = []
    for m in result.models:
        network = "no network" if m.role == "classical" else f"network {m.network_seconds:.2f} s" + (" (cached)" if m.cached else "")
        lines.append(f"{m.role} [{m.name}]: {m.objects} objects; inputs {m.inputs}; {network}, decode {m.decode_seconds:.2f} s")
        if m.ground_truth:
            gt = m.ground_truth
            lines.append(f"  vs ground truth: F1 {gt['f1']:.3f}, AJI {gt['aji']:.3f} ({gt['n_b']:.0f} nuclei, GT {gt['n_a']:.0f})")
    if result.agreement:
        a = result.agreement
        lines.append(f"student vs teacher: F1 {a['f1']:.3f}, AJI {a['aji']:.3f} ({a['n_b']:.0f} vs {a['n_a']:.0f} nuclei)")
    advice = sorted({line for m in result.models for line in m.advice})
    lines += [f"! {line}" for line in advice]
    return "\n".join(lines)
