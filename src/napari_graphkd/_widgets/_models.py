"""The model picker: a bundled model or a checkpoint file, with its architecture and size."""
from __future__ import annotations

from pathlib import Path

from magicgui.widgets import ComboBox, Container, FileEdit, Label

from ..guidance import training_summary
from ..io.checkpoint import CheckpointError
from ._layout import wrap
from ._state import MODELS

SOURCES = [("bundled teacher", "teacher"), ("bundled student", "student"),
           ("bundled teacher, BBBC039 specialist", "teacher-bbbc039"),
           ("bundled student, BBBC039 specialist", "student-bbbc039"), ("checkpoint file...", "file")]


def describe_model(description: dict) -> str:
    """Architecture, widths, resolution and parameter count; then what it was trained on (data, nucleus size)."""
    config = description.get("config", {})
    resolution = "half-resolution" if config.get("stem_stride") == 2 else "full-resolution"
    widths = "-".join(str(w) for w in config.get("widths", []))
    kind = ""
    if config.get("ndim", 2) == 3:
        voxel = description.get("voxel_size")
        kind = "3D (segments volumes as a whole" + (f", trained at voxel {':'.join(f'{v:g}' for v in voxel)} z:y:x" if voxel else "") + "), "
    return (f"{description.get('architecture', '?')} {widths}, {kind}{resolution}, {description.get('parameters', 0):,} "
            f"parameters; {training_summary(description)}")


class ModelPicker(Container):
    """A bundled model or a checkpoint file, with its architecture and parameter count."""

    def __init__(self, role: str, default: str):
        self.role = role
        self.source = ComboBox(label=role.title(), choices=SOURCES, value=default)
        self.path = FileEdit(label="Checkpoint", mode="r", filter="*.safetensors", visible=False)
        self.info = Label(value="")
        wrap(self.info.native)
        super().__init__(widgets=[self.source, self.path, self.info], labels=True)
        self.margins = (0, 0, 0, 0)
        self.source.changed.connect(self._source_changed)

    def _source_changed(self, value: str) -> None:
        self.path.visible = value == "file"

    @property
    def spec(self) -> str:
        """``teacher``/``student`` (bundled) or the checkpoint path; CheckpointError if none is chosen."""
        if self.source.value != "file":
            return self.source.value
        path = Path(self.path.value) if self.path.value else None
        if path is None or not path.is_file():
            raise CheckpointError(f"choose a checkpoint file (.safetensors) for the {self.role}")
        return str(path)

    def load(self):
        """The chosen segmenter (loaded once); CheckpointError says why it cannot be used."""
        return MODELS.get(self.spec)[1]

    @property
    def pending(self) -> bool:
        """True while "checkpoint file" is chosen but no file yet (nothing to complain about)."""
        return self.source.value == "file" and str(self.path.value) in ("", ".")

    def refresh(self) -> str | None:
        """Show the model's architecture and size; return why it cannot be loaded, if it cannot."""
        try:
            self.info.value = describe_model(self.load().describe())
        except CheckpointError as exc:
            self.info.value = f"not available: {exc}"
            return str(exc)
        return None
