"""Layout glue: docks narrow enough for a 1280 x 800 screen, tabified together, with the view refitted.

Layer names can be long (file names): dropdowns elide them and show the full name as a tooltip,
so a dock's minimum width never depends on them.
"""
from __future__ import annotations

from magicgui.widgets import ComboBox, Container
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import QComboBox, QDockWidget, QFrame, QLabel, QMainWindow, QScrollArea, QSizePolicy
from superqt import QCollapsible

MAX_DOCK_WIDTH = 420  # px: a dock this wide leaves a usable canvas on a 1280 x 800 screen
COMBO_CHARS = 10  # characters a dropdown shows before eliding
TEXT_WIDTH = 200  # px: word-wrapped text may shrink to this width (it grows taller instead)
DOCK_MIN_HEIGHT = 120  # px: the smallest height of a dock (its content scrolls)
SCROLLBAR = 20  # px the vertical scroll bar of a dock's scroll area takes


def elide_combo(combo: ComboBox) -> None:
    """Let a dropdown shrink below its longest item (elided text), with full names as tooltips."""
    native: QComboBox = combo.native
    native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    native.setMinimumContentsLength(COMBO_CHARS)
    native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def tooltips(*_) -> None:
        for i in range(native.count()):
            native.setItemData(i, native.itemText(i), Qt.ItemDataRole.ToolTipRole)
        native.setToolTip(native.currentText())

    native.model().rowsInserted.connect(tooltips)
    native.currentTextChanged.connect(tooltips)
    tooltips()


def wrap(label: QLabel) -> None:
    """Word-wrap a label whose minimum width never depends on its text."""
    label.setWordWrap(True)
    label.setMinimumWidth(TEXT_WIDTH)
    label.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)  # wrap at the dock's width


def compact(container: Container) -> None:
    """Elide every dropdown inside ``container`` (nested containers included) and wrap labels."""
    for widget in container:
        if isinstance(widget, ComboBox):
            elide_combo(widget)
        elif isinstance(widget, Container):
            compact(widget)


def collapsible(title: str, container: Container) -> QCollapsible:
    """A collapsed section (click the title to open) holding ``container``."""
    section = QCollapsible(title)
    section.addWidget(container.native)
    section.collapse(animate=False)
    return section


def dock_of(widget) -> QDockWidget | None:
    """The dock widget holding a magicgui widget, if it is docked."""
    parent = widget.native.parent()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parent()
    return parent


def scroll_in_dock(widget) -> None:
    """Put a docked widget in a vertical scroll area: the dock may be shorter than the widget (small screens)."""
    dock = dock_of(widget)
    if dock is None or dock.widget() is not widget.native:
        return
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setMinimumWidth(widget.native.minimumSizeHint().width() + SCROLLBAR)
    scroll.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Ignored)  # any height: it scrolls
    scroll._magic_widget = widget  # napari's dock_widgets maps the dock to the widget through this attribute
    scroll.setWidget(widget.native)
    dock.setWidget(scroll)
    dock.setMinimumSize(scroll.minimumWidth(), DOCK_MIN_HEIGHT)  # the size it was given for the unscrolled widget


def tabify_with_siblings(widget, kind: type) -> None:
    """Put the widget's dock in one tab group with the other docks of ``kind`` in the same area (and raise it)."""
    mine = dock_of(widget)
    if mine is None or not isinstance(mine.parent(), QMainWindow):
        return
    window: QMainWindow = mine.parent()
    siblings = [dock for dock in window.findChildren(QDockWidget)
                if dock is not mine and isinstance(getattr(dock.widget(), "_magic_widget", None), kind)
                and not dock.isFloating() and window.dockWidgetArea(dock) == window.dockWidgetArea(mine)]
    if siblings:
        anchor = siblings[0]
        for dock in [mine, *siblings[1:]]:
            if dock not in window.tabifiedDockWidgets(anchor):
                window.tabifyDockWidget(anchor, dock)
    mine.show()
    mine.raise_()


class FirstShow(QObject):
    """Runs a callback once, after the widget is first shown (docked: the canvas has its final size)."""

    def __init__(self, target, callback) -> None:
        super().__init__(target)
        self._callback = callback
        target.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.Show:
            obj.removeEventFilter(self)
            QTimer.singleShot(0, self._callback)
        return False
