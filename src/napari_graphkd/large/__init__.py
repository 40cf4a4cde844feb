"""Out-of-core segmentation: chunked network and decoding with halos, stitched into global ids in Zarr.

Names are imported on first use, so ``graphkd --help`` does not load torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"ChunkError": "run", "DaskExecutor": "run", "Progress": "run", "ThreadExecutor": "run",
            "run_to_end": "run", "segment_large": "run", "LabelsTarget": "zarr_io", "Source": "zarr_io",
            "default_target": "zarr_io", "from_array": "zarr_io", "open_image": "zarr_io"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Lazily import the public names from their modules."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
