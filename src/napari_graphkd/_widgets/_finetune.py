"""The "Fine-tune / distil" widget: train the networks on the user's (partial) annotation in the background.

Glue only: the annotation rules, the held-out split, training, scoring and saving live in
:mod:`napari_graphkd.train.finetune`. The job runs the library in a thread of its own with up to
two torch threads, leaving a core free for the viewer, and relays its progress records to the widget.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import napari  # noqa: F401 - the viewer annotation
import numpy as np
import torch
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, SpinBox
from napari.layers import Image, Labels, Layer, Shapes
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QFontDatabase, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget

from ..io.checkpoint import CheckpointError
from ..preprocess import InputError
from ..runtime import usable_cpus
from ..train.finetune import (
    DEFAULT_FOLDER,
    MODES,
    AnnotatedImage,
    FinetunePlan,
    FinetuneResult,
    FinetuneSettings,
    finetune_report,
    plan_finetune,
    run_finetune,
)
from ._base import JobWidget
from ._jobs import JobResult, _guard, relay
from ._layers import provenance
from ._layout import compact, wrap
from ._models import ModelPicker
from ._segment import SegmentWidget, layer_voxel_size
from ._state import MODELS

COLOURS = ("#4fc3f7", "#ffb74d", "#aed581")
GROUND_TRUTH_WORDS = ("ground truth", "ground_truth", "groundtruth", " gt", "gt ", "_gt")
MIN_HELDOUT_CELLS = 10  # fewer held-out cells than this: the before/after scores are a rough hint only
JOB_THREADS = 2  # a fine-tuning job's torch threads where the machine has a CPU more for the viewer
HELP = ("Paint nuclei in a Labels layer (one id per cell, not all needed). Unpainted pixels within the margin of "
        "a cell are background; so is every unpainted pixel inside the 'Checked' Shapes layer (areas where you "
        "painted every nucleus); other pixels are ignored. A fifth of the cells are held back for scoring. "
        "3D models fine-tune on a (Z,Y,X) Image layer with a (Z,Y,X) Labels layer.")


class LossCurve(QWidget):
    """Live training loss, one line per phase (e.g. teacher, then student)."""

    def __init__(self) -> None:
        super().__init__()
        self.series: dict[str, list[float]] = {}
        self.setMinimumHeight(90)

    def add(self, phase: str, loss: float) -> None:
        """Append one step's loss and repaint."""
        self.series.setdefault(phase, []).append(loss)
        self.update()

    def clear(self) -> None:
        """Forget every curve."""
        self.series = {}
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt's name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), QColor("#262930"))
        values = [v for losses in self.series.values() for v in losses]
        if not values:
            painter.setPen(QColor("#9e9e9e"))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "training loss")
            return
        low, high = min(values), max(values)
        w, h, span = self.width() - 8, self.height() - 24, (high - low) or 1.0
        for i, (phase, losses) in enumerate(self.series.items()):
            colour = QColor(COLOURS[i % len(COLOURS)])
            points = [QPointF(4 + w * k / max(1, len(losses) - 1), 4 + h * (high - v) / span) for k, v in enumerate(losses)]
            painter.setPen(QPen(colour, 1.5))
            painter.drawPolyline(QPolygonF(points))
            painter.drawText(6 + 190 * i, self.height() - 6, f"{phase}: {losses[-1]:.3f}")


def suspect(layer: Layer) -> str | None:
    """Why a Labels layer is probably not the user's annotation (a model's result, ground truth), or None."""
    prov = provenance(layer)
    if prov.get("created_by") and not prov.get("edited"):
        return f"{layer.name!r} is a result of the {prov.get('model', 'model')} model, not your annotation"
    lowered = layer.name.lower()
    if any(word in lowered for word in GROUND_TRUTH_WORDS):
        return f"{layer.name!r} looks like ground truth, not your own annotation"
    return None


def annotation_rank(layer: Layer) -> int:
    """Order of annotation candidates: the user's own layers, then hand-edited results, then suspects."""
    if suspect(layer) is not None:
        return 2
    return 1 if provenance(layer) else 0


class AnnotationRow(Container):
    """One image with the Labels layer holding its annotation and, optionally, Shapes marking checked regions."""

    def __init__(self, widget: "FinetuneWidget"):
        self.image = ComboBox(label="Image", choices=widget.layer_choices(Image))
        self.painted = ComboBox(label="Annotation", choices=widget.layer_choices(Labels),
                                tooltip="Your Labels layer: every painted id is one cell")
        self.regions = ComboBox(label="Checked", choices=widget.layer_choices(Shapes), nullable=True, value=None,
                                tooltip="Optional Shapes layer of regions you checked completely: "
                                        "inside them every unpainted pixel is background")
        super().__init__(widgets=[self.image, self.painted, self.regions], labels=True)
        self.margins = (0, 0, 0, 0)
        compact(self)

    def prefer_user_layer(self) -> None:
        """Move the annotation off a model's result or ground truth when a layer of the user's own exists."""
        current = self.painted.value
        choices = [layer for layer in self.painted.choices if layer is not None]
        best = min(choices, key=annotation_rank, default=None)  # (the dropdown keeps its own item order)
        if best is not None and (current is None or annotation_rank(current) > annotation_rank(best)):
            self.painted.value = best


@dataclass(frozen=True)
class FinetuneRequest:
    """A validated plan and where the new checkpoints go."""

    plan: FinetunePlan
    folder: Path


def job_threads() -> int:
    """Torch threads of a fine-tuning job: up to two, leaving a CPU for the viewer."""
    return max(1, min(JOB_THREADS, usable_cpus() - 1))


def finetune_job(request: FinetuneRequest, cancel: threading.Event):
    """Run the library with :func:`job_threads` torch threads; yield its progress records; return the outcome."""
    return (yield from _guard(_finetune(request, cancel), request))


def _finetune(request: FinetuneRequest, cancel: threading.Event):
    trained = threading.Event()  # a training phase finished: the run may go on to save, so a cancel waits for it

    def work(report) -> FinetuneResult:
        def forward(record: dict) -> None:
            if record["loss"] is not None and record["done"] >= record["total"]:
                trained.set()
            report(record)

        previous = torch.get_num_threads()
        torch.set_num_threads(job_threads())
        try:
            return run_finetune(request.plan, request.folder, on_progress=forward, should_stop=cancel.is_set)
        finally:
            torch.set_num_threads(previous)

    # Before training ends a stopped run never saves: the job may end at once and leave the thread to stop.
    abandonable = SimpleNamespace(is_set=lambda: cancel.is_set() and not trained.is_set())
    result = yield from relay(work, abandonable)
    return JobResult(request, finetune=result, cancelled=result.cancelled)


def same_placement(a: Layer, b: Layer) -> bool:
    """True when two layers of one dimensionality have the same scale and translation (their pixels coincide)."""
    return bool(np.allclose(a.scale, b.scale) and np.allclose(a.translate, b.translate))


def checked_mask(shapes: Shapes, shape: tuple[int, ...]) -> np.ndarray:
    """Pixels of an image (or voxels of a volume) of ``shape`` inside any shape of a Shapes layer of its dimensionality."""
    if shapes.ndim != len(shape):
        raise InputError(f"the checked regions {shapes.name!r} must be a {len(shape)}D Shapes layer")
    if shapes.nshapes == 0:
        raise InputError(f"the Shapes layer {shapes.name!r} has no shapes; draw the regions you checked")
    return shapes.to_masks(mask_shape=shape).any(axis=0)


def annotated_image(row: AnnotationRow) -> AnnotatedImage:
    """The row's layers as library input; InputError for missing or misplaced layers."""
    image, labels, regions = row.image.value, row.painted.value, row.regions.value
    if image is None:
        raise InputError("choose an Image layer for every row")
    if image.multiscale or image.ndim not in (2, 3) or (image.ndim == 3 and image.rgb):
        raise InputError(f"{image.name!r}: fine-tuning takes single-scale 2D images (gray or RGB) or gray (Z,Y,X) "
                         "volumes (with 3D models), one per row")
    if labels is None:
        raise InputError(f"choose the Labels layer holding your annotation of {image.name!r}")
    for layer in (labels, regions):
        if layer is not None and layer.ndim == image.ndim and not same_placement(image, layer):
            raise InputError(f"{layer.name!r} is not placed like {image.name!r} (scale or translation differ)")
    shape = np.shape(image.data)[:image.ndim]
    checked = None if regions is None else checked_mask(regions, shape)
    return AnnotatedImage(image.name, np.asarray(image.data), np.asarray(labels.data), checked)


class FinetuneWidget(JobWidget):
    """Distil or fine-tune the student (or the teacher) on annotated images; new checkpoints, never overwritten.

    Scores before and after are measured on annotated cells held back from training; the new
    models become the current ones of this widget and of every open Segment widget.
    """

    def __init__(self, viewer: napari.viewer.Viewer):  # napari injects the viewer (matched by this annotation)
        super().__init__(viewer, labels=True)
        self.last_result: FinetuneResult | None = None
        self._bar: progress | None = None
        self.mode = ComboBox(label="Mode", choices=[(text, key) for key, text in MODES.items()], value=FinetuneSettings.mode)
        self.rows = Container(widgets=[AnnotationRow(self)], labels=False)
        self.add_row = PushButton(text="Add image")
        self.remove_row = PushButton(text="Remove last image")
        self.add_row.changed.connect(self._add_row)
        self.remove_row.changed.connect(self._remove_row)
        self.pickers = {"teacher": ModelPicker("teacher", "teacher"), "student": ModelPicker("student", "student")}
        self.diameter = FloatSpinBox(label="Diameter (px)", value=0.0, min=0.0, max=1000.0, step=1.0,
                                     tooltip="Typical nucleus diameter; 0 = measured from your painted cells "
                                             "(volumes: run at the 3D models' own scale)")
        self.diameter.native.setSpecialValueText("measure")  # the spin box shows "measure" at 0
        self.invert = CheckBox(text="Dark nuclei on a bright background",
                               tooltip="Ticked: invert the images; unticked: detected on the images, as Segment does")
        self.margin = SpinBox(label="Margin (px)", value=FinetuneSettings.margin, min=0, max=500,
                              tooltip="Unpainted pixels this close to a painted cell are background; "
                                      "other unpainted pixels (outside checked regions) are ignored")
        self.steps = SpinBox(label="Steps", value=FinetuneSettings.steps, min=1, max=100000,
                             tooltip="Training steps of the student")
        self.teacher_steps = SpinBox(label="Teacher steps", value=FinetuneSettings.teacher_steps, min=1, max=100000,
                                     tooltip="Training steps of the teacher before the student learns from it")
        self.mode.changed.connect(self._mode_changed)
        self.folder = FileEdit(label="Save in", mode="d", value=str(DEFAULT_FOLDER.expanduser()),
                               tooltip="Folder for the new models (existing files are never overwritten)")
        self.confirm = CheckBox(text="Train on it anyway", visible=False,
                                tooltip="The chosen annotation is a model's result or ground truth; tick to use it")
        self.help = Label(value=HELP)
        wrap(self.help.native)
        self.start_button = PushButton(text="Start")
        self.start_button.changed.connect(lambda _=None: self.start())
        self.actions = [self.start_button, self.add_row, self.remove_row]
        self.curve = LossCurve()
        self.extend([self.mode, self.rows,
                     Container(widgets=[self.add_row, self.remove_row], layout="horizontal", labels=False),
                     *self.pickers.values(), self.diameter, self.invert, self.margin, self.steps, self.teacher_steps, self.folder,
                     self.confirm, self.start_button, self.progress, self.cancel_button])
        self.rows[0].painted.changed.connect(self._annotation_changed)
        self.rows[0].prefer_user_layer()
        self._annotation_changed()
        self._mode_changed()
        self.report.native.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))  # aligned score table
        self.native.layout().insertWidget(1, self.help.native)  # below the mode, using the whole width
        for full_width in (self.report.native, self.curve):  # below the form, using its whole width
            self.native.layout().addWidget(full_width)
        for picker in self.pickers.values():
            picker.source.changed.connect(lambda _=None, p=picker: p.refresh())
            picker.path.changed.connect(lambda _=None, p=picker: p.refresh())
            picker.refresh()
        self.finish_layout()

    def layer_choices(self, kind: type):
        """Choices callback: the viewer's layers of one type (images: not ones napari-graphkd made; labels: the user's first)."""
        def choices(widget=None) -> list:
            layers = [layer for layer in self.viewer.layers if isinstance(layer, kind) and not (kind is Image and provenance(layer))]
            if kind is Labels:
                layers.sort(key=annotation_rank)
            return [(layer.name, layer) for layer in layers]

        return choices

    def _add_row(self, _=None) -> None:
        row = AnnotationRow(self)
        row.painted.changed.connect(self._annotation_changed)
        self.rows.append(row)
        row.prefer_user_layer()

    def _layers_changed(self, event=None) -> None:
        super()._layers_changed(event)
        try:
            for row in self.rows:
                row.prefer_user_layer()
            self._annotation_changed()
        except RuntimeError:  # the Qt widget is already deleted (viewer closing)
            pass

    def suspects(self) -> list[str]:
        """Why chosen annotations look like a model's result or ground truth (empty when they are the user's)."""
        return [why for row in self.rows if row.painted.value is not None and (why := suspect(row.painted.value))]

    def _annotation_changed(self, *_) -> None:
        problems = self.suspects()
        self.confirm.visible = bool(problems)
        if not problems:
            self.confirm.value = False

    def _mode_changed(self, *_) -> None:
        self.teacher_steps.visible = self.mode.value == "teacher"

    def _remove_row(self, _=None) -> None:
        if len(self.rows) > 1:
            self.rows.pop()

    def settings(self, voxel_size: tuple[float, float, float] | None = None) -> FinetuneSettings:
        """Settings from the controls (diameter 0 = measure, for volumes: as trained; unchecked inversion = the model's
        default); ``voxel_size`` of volumes (z, y, x) from their layers' scale."""
        return FinetuneSettings(mode=self.mode.value, steps=int(self.steps.value), teacher_steps=int(self.teacher_steps.value),
                                margin=int(self.margin.value), diameter=self.diameter.value or None,
                                invert=True if self.invert.value else None, voxel_size=voxel_size)

    def _request(self) -> FinetuneRequest:
        rows = list(self.rows)
        for kind in ("image", "painted"):
            chosen = [getattr(row, kind).value for row in rows if getattr(row, kind).value is not None]
            if len({layer.unique_id for layer in chosen}) < len(chosen):
                raise InputError(f"the same {'Image' if kind == 'image' else 'Labels'} layer is chosen twice")
        folder = Path(self.folder.value).expanduser()
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder} is a file, not a folder: choose where to save the new models")
        models = [self.pickers[role].load() for role in ("teacher", "student")]
        volume = next((row.image.value for row in rows if row.image.value is not None and row.image.value.ndim == 3), None)
        if volume is not None and all(m.ndim == 2 for m in models):
            raise InputError(f"{volume.name!r} is a (Z,Y,X) volume: the models are 2D and fine-tune on 2D images; "
                             "choose 3D models to fine-tune on volumes")
        images = [annotated_image(row) for row in rows]
        teacher, student = (m.path for m in models)
        return FinetuneRequest(plan_finetune(images, self.settings(volume_voxel_size(rows)), teacher, student), folder)

    def start(self):
        """Validate the inputs and start training; returns the worker, or None (with a notification) if nothing starts."""
        problems = self.suspects()
        if problems and not self.confirm.value:
            self._annotation_changed()
            show_warning(f"napari-graphkd: {problems[0]}; paint your own Labels layer, or tick 'Train on it anyway'")
            return None
        try:
            request = self._request()
        except (InputError, CheckpointError) as exc:
            show_error(f"napari-graphkd: {exc}")
            return None
        caution = heldout_caution(request.plan)
        if caution:
            show_warning(f"napari-graphkd: {caution}")
        return self._start(finetune_job, request, self._show)

    def _set_running(self, running: bool) -> None:
        super()._set_running(running)
        if running:  # called before the worker starts, so every progress record finds the bar
            self.curve.clear()
            self.report.value = ""
            self._bar = progress(total=1, desc="napari-graphkd: fine-tuning")

    def _on_progress(self, record: dict) -> None:
        bar = self._bar  # updating napari's progress bar may run the event loop and finish the job meanwhile
        if bar is None:  # a record queued before the job finished arrives after it: nothing to update
            return
        self.progress.value = int(round(100 * record["done"] / record["total"]))
        bar.total = record["total"]
        bar.update(record["done"] - bar.n)
        bar.set_description(f"napari-graphkd: {record['phase']}")
        if record["loss"] is not None:
            self.curve.add(record["phase"], record["loss"])

    def _on_returned(self, outcome: JobResult, on_done) -> None:
        super()._on_returned(outcome, on_done)
        if outcome.cancelled:  # the library's own report when it stopped in time, else the short story
            self.report.value = (finetune_report(outcome.finetune, outcome.request.plan) if outcome.finetune is not None
                                 else "cancelled: nothing saved, the models are unchanged")

    def _after_job(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _show(self, outcome: JobResult) -> None:
        result, plan = outcome.finetune, outcome.request.plan
        for role, path in result.saved.items():
            self.use_model(role, path)
        for widget in self._segment_widgets():
            widget.use_inputs(plan.diameter, plan.invert)
        self.last_result = result
        caution = heldout_caution(plan)
        self.report.value = finetune_report(result, plan) + (f"\ncaution: {caution}" if caution else "")
        inputs = "" if plan.diameter is None else f", with diameter {plan.diameter:.1f} px"
        show_info("napari-graphkd: saved " + ", ".join(p.name for p in result.saved.values())
                  + f"; now the current model(s) here and in the Segment widget{inputs}"
                  + (" and inversion" if plan.invert else ""))

    def _segment_widgets(self) -> list[SegmentWidget]:
        return [w for w in self.viewer.window.dock_widgets.values() if isinstance(w, SegmentWidget)]

    def use_model(self, role: str, path: Path) -> None:
        """Load a checkpoint into the model cache and make it the ``role`` model here and in every Segment widget."""
        MODELS.get(str(path))
        for picker in [self.pickers[role]] + [w.pickers[role] for w in self._segment_widgets()]:
            picker.source.value = "file"
            picker.path.value = str(path)


def volume_voxel_size(rows: list[AnnotationRow]) -> tuple[float, float, float] | None:
    """The voxel size (z, y, x) of the rows' volume layers, from their scale (None: 2D images, or as the models were trained);
    InputError when the volumes differ."""
    sizes = {layer_voxel_size(row.image.value) for row in rows if row.image.value is not None and row.image.value.ndim == 3}
    if len(sizes) > 1:
        raise InputError("the volumes have different voxel sizes (layer scales); fine-tune on volumes of one voxel size")
    return sizes.pop() if sizes else None


def heldout_caution(plan: FinetunePlan) -> str | None:
    """A caution when the held-out score rests on too few cells to mean much."""
    n = len(np.unique(plan.heldout.cells)) - 1
    if n >= MIN_HELDOUT_CELLS:
        return None
    return (f"the before/after score rests on {n} held-out cell{'s' if n != 1 else ''} only; "
            f"paint more cells (about {5 * MIN_HELDOUT_CELLS} or more) for a score you can trust")
