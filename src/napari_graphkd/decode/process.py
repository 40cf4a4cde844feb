"""Decoding large network outputs in a worker process, so a GUI's event loop keeps running.

``mwatershed`` holds the GIL while it agglomerates (~2 s at a 1500 x 1500 working size): run in a
thread of the viewer's process it freezes the viewer. A process that turns on
:func:`offload_large_decodes` (the napari widgets do) sends every output of more than
``WORKER_PIXELS`` working pixels to one pre-started worker process (``spawn`` context, the same on
every OS) and gets the labels back; they are identical to in-process decoding, which the CLI and
the library keep using by default. A worker that dies is replaced once, then decoding falls back
to this process.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

import numpy as np

from .mws import DecodeSettings

if TYPE_CHECKING:
    from ..inference import NetworkOutput

WORKER_PIXELS = 1_000_000  # working pixels (voxels of a volume) above which an offloading process decodes in the worker (~0.5 s and more)

log = logging.getLogger(__name__)
_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_offload = False


def _warm() -> None:
    """Worker start-up: import the decoder (torch, mwatershed) before the first job arrives."""
    from ..runtime import configure_threads
    from . import policy  # noqa: F401

    configure_threads()


def _executor() -> ProcessPoolExecutor:
    """The one worker process, started on first use."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_warm)
        return _pool


def prewarm() -> Future:
    """Start the worker now (its imports take seconds), so the first large decode does not wait for them."""
    return _executor().submit(int)


def offload_large_decodes(enabled: bool = True) -> None:
    """Decode outputs above WORKER_PIXELS in the worker process from now on (GUI processes); starts it."""
    global _offload
    _offload = enabled
    if enabled:
        prewarm()


def wants_worker(output: NetworkOutput) -> bool:
    """Whether this process decodes ``output`` in the worker: offloading is on and the output is large."""
    return _offload and math.prod(output.full_shape) > WORKER_PIXELS


def decode_in_worker(output: NetworkOutput, settings: DecodeSettings = DecodeSettings(),
                     offsets=None) -> tuple[np.ndarray, float]:
    """``decode_output(output, settings, offsets)`` computed in the worker process: the same labels and its decode time."""
    from .policy import decode_output

    global _pool
    for attempt in range(2):
        try:
            return _executor().submit(decode_output, output, settings, offsets).result()
        except BrokenProcessPool:
            log.warning("the decoder worker process died; %s", "restarting it" if attempt == 0 else "decoding here")
            with _lock:
                _pool = None
    return decode_output(output, settings, offsets)


def shutdown() -> None:
    """Stop the worker process (it is started again when needed)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
