"""State shared by the widgets: loaded models and the network-output cache.

Both are module-level (shared by every widget of every viewer) and hold no viewer or layer
objects, only layer ids and weak references to layer data, so closing a viewer frees it.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable

from .. import segment
from ..segment import Segmenter
CACHE_BYTES = 2 * 1024**3


def model_key(spec: str) -> tuple:
    """Identity of a model spec: the file and its modification time (a rewritten checkpoint is a new model)."""
    if spec == "classical":
        return ("classical",)
    path = segment.bundled_path(spec) if spec in segment.BUNDLED else Path(spec)
    try:
        stat = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


class ModelRegistry:
    """Loaded segmenters by spec, loaded once and reloaded when their file changes."""

    def __init__(self) -> None:
        self._models: dict[str, tuple[tuple, Segmenter]] = {}
        self._lock = threading.Lock()

    def get(self, spec: str) -> tuple[tuple, Segmenter]:
        """(model key, segmenter) for ``teacher``, ``student``, ``classical`` or a checkpoint path."""
        key = model_key(spec)
        with self._lock:
            known = self._models.get(spec)
            if known is not None and known[0] == key:
                return known
        segmenter = segment.load_segmenter(spec)  # raises CheckpointError with the reason
        with self._lock:
            self._models[spec] = (key, segmenter)
        return key, segmenter


@dataclass
class _Entry:
    value: Any
    data: weakref.ref
    nbytes: int


class OutputCache:
    """LRU cache of network outputs keyed by (layer id, model key, plane, run settings), bounded in bytes.

    An entry is valid only while the image layer still holds the same data object.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, data: Any) -> Any | None:
        """Cached value for ``key`` computed from ``data``, or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.data() is not data:
                return None
            self._entries.move_to_end(key)
            return entry.value

    def fetch(self, key: Hashable, data: Any, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, was_cached): the cached value, or ``compute()`` stored under ``key``."""
        value = self.get(key, data)
        if value is not None:
            return value, True
        value = compute()
        nbytes = value.embedding.nbytes + (value.foreground.nbytes if value.foreground is not None else 0)
        with self._lock:
            self._entries[key] = _Entry(value, weakref.ref(data), nbytes)
            self._entries.move_to_end(key)
            while len(self._entries) > 1 and sum(e.nbytes for e in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)
        return value, False

    def clear(self) -> None:
        """Forget every cached output."""
        with self._lock:
            self._entries.clear()


MODELS = ModelRegistry()
CACHE = OutputCache()
