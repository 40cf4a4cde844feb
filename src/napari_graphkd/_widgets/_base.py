"""Base of the widgets: a magicgui Container that runs one job at a time in a napari thread_worker."""
from __future__ import annotations

import threading
from typing import Callable

from magicgui.widgets import Container, Label, ProgressBar, PushButton
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning

from ..decode.process import offload_large_decodes
from ..runtime import configure_threads
from ._layout import FirstShow, compact, scroll_in_dock, tabify_with_siblings, wrap


class JobWidget(Container):
    """Container with a progress bar, a Cancel button, and one background job at a time.

    Subclasses build their controls, then call ``self.extend(self.footer())``. ``busy`` is True
    from ``_start`` until the job's ``finished`` signal has been handled (tests wait on it).
    """

    def __init__(self, viewer, **kwargs):
        super().__init__(**kwargs)
        offload_large_decodes()  # mwatershed holds the GIL: large decodes run in a worker process
        self.viewer = viewer
        self.progress = ProgressBar(value=0, min=0, max=100, label="Progress")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.cancel_button.changed.connect(self.cancel)
        self.report = Label(value="")
        wrap(self.report.native)
        self.actions: list[PushButton] = []  # buttons that start jobs, disabled while one runs
        self._worker = None
        self._cancel = threading.Event()
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved):
            event.connect(self._layers_changed)
        self._first_show = FirstShow(self.native, self._docked)

    def finish_layout(self) -> None:
        """Elide dropdowns so no layer name widens the widget; the report goes last, using the whole width."""
        compact(self)
        if self.native.layout().indexOf(self.report.native) < 0:
            self.native.layout().addWidget(self.report.native)

    def _docked(self) -> None:
        """Once shown in its dock: share a tab group with the plugin's other docks, refit the view to the smaller canvas."""
        try:
            scroll_in_dock(self)
            tabify_with_siblings(self, JobWidget)
            self.viewer.reset_view()
        except RuntimeError:  # the window closed before the first paint
            pass

    def footer(self) -> list:
        """Progress and Cancel, to put at the bottom (the report goes below them, full width)."""
        return [self.progress, self.cancel_button]

    @property
    def busy(self) -> bool:
        """True while a job runs (or its results are being shown)."""
        return self._worker is not None

    def cancel(self) -> None:
        """Ask the running job to stop at the next tile or plane."""
        self._cancel.set()

    def _layers_changed(self, event=None) -> None:
        try:
            self.reset_choices()
        except RuntimeError:  # the Qt widget is already deleted (viewer closing)
            pass

    def _start(self, job: Callable, request, on_done: Callable):
        """Run ``job(request, cancel_event)`` in a thread_worker; ``on_done(result)`` gets a successful result."""
        if self.busy:
            show_warning("napari-graphkd is still working; wait or press Cancel")
            return None
        self._cancel = threading.Event()
        configure_threads()  # one torch thread per idle usable CPU now, passive OpenMP waits, one BLAS thread
        worker = thread_worker(job)(request, self._cancel)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda result: self._on_returned(result, on_done))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.progress.value = 0
        self._set_running(True)
        worker.start()
        return worker

    def _set_running(self, running: bool) -> None:
        self.cancel_button.enabled = running
        for button in self.actions:
            button.enabled = not running

    def _on_progress(self, fraction: float) -> None:
        self.progress.value = int(round(100 * fraction))

    def _on_returned(self, result, on_done: Callable) -> None:
        if result.cancelled:
            show_info("napari-graphkd: cancelled")
        elif result.error is not None:
            show_error(f"napari-graphkd: {result.error}")
            self.report.value = f"failed: {result.error}"  # never leave the previous run's report standing
        else:
            for warning in result.warnings:
                show_warning(f"napari-graphkd: {warning}")
            on_done(result)

    def _on_finished(self) -> None:
        self._worker = None
        self._set_running(False)
        self._after_job()

    def _after_job(self) -> None:
        """Hook run when a job has finished (e.g. start a pending re-decode)."""
