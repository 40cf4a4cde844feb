"""Safe checkpoints: safetensors weights + JSON metadata; loading never unpickles.

A checkpoint is one ``.safetensors`` file whose header metadata holds a JSON document under the key
``graphkd`` (architecture config, offsets, input rules, provenance, metrics, package version).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..affinity import offsets_for
from ..models import EmbeddingUNet, UNetConfig
from ..preprocess import HOT_PIXEL_MARGIN, MIN_CONTRAST_SNR, PERCENTILES
from .schema import FORMAT_VERSION, SchemaError, validate_metadata

METADATA_KEY = "graphkd"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, foreign or does not match its architecture."""


def _commit(tmp: str, path: Path) -> None:
    """Make a finished temp file durable, then move it over ``path`` in one step (fsync file, rename, fsync folder)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if os.name == "posix":  # the rename itself survives a power cut only once the folder is synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_beside(path: Path) -> str:
    """A new empty temp file ``.<name>.<random>.tmp`` next to ``path`` (stale ones are recognised by that pattern)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], overwrite: bool) -> None:
    """Write a safetensors file via a temporary file + rename so a crash never leaves half a file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (refusing to overwrite; pass overwrite=True)")
    tmp = _temp_beside(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        _commit(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temporary file + rename (replacing any previous version)."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
        _commit(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_stale_temp(path: Path) -> bool:
    """True for a temp file left by an interrupted atomic write (``.<name>.<random>.tmp``)."""
    return path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp")


def save_checkpoint(
    path: str | Path,
    model: EmbeddingUNet,
    metadata: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
    half: bool = False,
) -> Path:
    """Save a model and its metadata atomically; ``half`` stores fp16 weights (small bundled files)."""
    meta = default_metadata(model)
    meta.update(metadata or {})
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    atomic_save_tensors(state, Path(path), {METADATA_KEY: json.dumps(meta)}, overwrite)
    return Path(path)


def default_metadata(model: EmbeddingUNet) -> dict[str, Any]:
    """Metadata every checkpoint carries, whatever else the caller adds."""
    return {
        "format_version": FORMAT_VERSION,
        "architecture": "EmbeddingUNet",
        "config": model.config.to_dict(),
        "embedding_dim": model.config.embedding_dim,
        "offsets": [list(o) for o in offsets_for(model.config.ndim)],  # 3D training passes its anisotropic ones
        "input": {"channels": model.config.in_channels, "normalization": "percentile", "percentiles": list(PERCENTILES),
                  "min_contrast_snr": MIN_CONTRAST_SNR, "hot_pixel_margin": HOT_PIXEL_MARGIN},
        "package_version": __version__,
    }


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of a checkpoint without loading its weights; raises CheckpointError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") from None
    if METADATA_KEY not in raw:
        raise CheckpointError(f"{path} is a safetensors file but not a napari-graphkd checkpoint (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} has corrupt metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("architecture") != "EmbeddingUNet" or "config" not in meta:
        raise CheckpointError(f"{path}: metadata does not describe a napari-graphkd network")
    try:
        validate_metadata(meta)
    except SchemaError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return meta


def load_checkpoint(path: str | Path) -> tuple[EmbeddingUNet, dict[str, Any]]:
    """Build the network described by a checkpoint and load its weights (fp32, eval mode)."""
    meta = read_metadata(path)
    try:
        config = UNetConfig.from_dict(meta["config"])
        model = EmbeddingUNet(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid architecture config: {exc}") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: weights are unreadable (corrupt or truncated?): {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the architecture in its metadata "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    model.eval()
    return model, meta
