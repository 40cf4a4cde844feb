"""Checkpoint metadata schema: every field that drives what is built or run is checked before anything is built.

A checkpoint may come from anyone. Its metadata decides the network's size, the input rules and
the decoder, so each of those fields is checked for type, known keys, allowed values and bounds
(no absurd widths that would allocate terabytes); free-form provenance (name, command, metrics)
is only checked for being JSON. :func:`validate_metadata` raises :class:`SchemaError` naming the field.
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from ..affinity import OFFSETS
from ..decode.mws import DecodeSettings
from ..decode.policy import COARSE_FACTORS
from ..models import UNetConfig

FORMAT_VERSION = 1
MAX_LEVELS = 8
MAX_WIDTH = 1024
MAX_EMBEDDING_DIM = 256
MAX_IN_CHANNELS = 8
MAX_PARAMETERS = 150_000_000  # ~600 MB of fp32 weights; the bundled teacher has ~2 M, the MALA-width 3D net ~122 M
BLOCKS = ("residual", "separable")
NORMALIZATIONS = ("percentile",)


class SchemaError(ValueError):
    """A metadata field has the wrong type, an unknown key, a value out of range or bounds."""


def _fail(field: str, problem: str) -> None:
    raise SchemaError(f"metadata field '{field}' {problem}")


def _number(value: Any, field: str, lo: float, hi: float, integer: bool = False) -> None:
    """A finite int/float (an int when ``integer``) in [lo, hi]; bools are not numbers."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        _fail(field, f"must be {'an integer' if integer else 'a number'}, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and lo <= value <= hi):
        _fail(field, f"must lie in [{lo}, {hi}], got {value!r}")


def _boolean(value: Any, field: str) -> None:
    if not isinstance(value, bool):
        _fail(field, f"must be true or false, got {value!r}")


def _choice(value: Any, field: str, allowed: tuple) -> None:
    if value not in allowed:
        _fail(field, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _section(value: Any, field: str, known: set[str]) -> dict:
    """A JSON object whose keys are all known."""
    if not isinstance(value, dict):
        _fail(field, f"must be an object, got {type(value).__name__} {value!r}")
    unknown = sorted(set(value) - known)
    if unknown:
        _fail(f"{field}.{unknown[0]}", f"is not a known key (known: {', '.join(sorted(known))})")
    return value


def estimated_parameters(widths: list[int], in_channels: int, ndim: int = 2) -> int:
    """Upper estimate of the parameters of a U-Net of these widths (residual blocks), without building it."""
    def block(cin: int, cout: int) -> int:
        return 3**ndim * (2 * cin * cout + cout * cout)

    total = block(in_channels, widths[0])
    total += sum(block(widths[i - 1], widths[i]) for i in range(1, len(widths)))
    total += sum(block(widths[i] + widths[i - 1], widths[i - 1]) for i in range(1, len(widths)))
    return total


def validate_config(config: Any) -> None:
    """The architecture section: known keys, enum values and sizes that cannot exhaust memory."""
    known = {f.name for f in fields(UNetConfig)}
    config = _section(config, "config", known)
    widths = config.get("widths", list(UNetConfig.widths))
    if not isinstance(widths, list) or not 2 <= len(widths) <= MAX_LEVELS:
        _fail("config.widths", f"must be a list of 2 to {MAX_LEVELS} integers, got {widths!r}")
    for i, width in enumerate(widths):
        _number(width, f"config.widths[{i}]", 1, MAX_WIDTH, integer=True)
    _number(config.get("in_channels", 1), "config.in_channels", 1, MAX_IN_CHANNELS, integer=True)
    _number(config.get("embedding_dim", 16), "config.embedding_dim", 1, MAX_EMBEDDING_DIM, integer=True)
    _choice(config.get("stem_stride", 1), "config.stem_stride", (1, 2))
    _choice(config.get("block", "residual"), "config.block", BLOCKS)
    _boolean(config.get("foreground_head", True), "config.foreground_head")
    ndim = config.get("ndim", 2)
    _choice(ndim, "config.ndim", (2, 3))
    pool = config.get("pool")
    if pool is not None:
        if not isinstance(pool, list) or len(pool) != len(widths) - 1:
            _fail("config.pool", f"must be a list of {len(widths) - 1} levels, got {pool!r}")
        for i, level in enumerate(pool):
            if not isinstance(level, list) or len(level) != ndim:
                _fail(f"config.pool[{i}]", f"must be a list of {ndim} factors, got {level!r}")
            for a, factor in enumerate(level):
                _number(factor, f"config.pool[{i}][{a}]", 1, 4, integer=True)
    n = estimated_parameters(widths, config.get("in_channels", 1), ndim)
    if n > MAX_PARAMETERS:
        _fail("config.widths", f"describes a network of ~{n:,} parameters (more than {MAX_PARAMETERS:,})")


def validate_decode(decode: Any) -> None:
    """Decoder settings: known keys, types, ranges and the decoding grid."""
    decode = _section(decode, "decode", {f.name for f in fields(DecodeSettings)})
    checks = {
        "attractive_bias": lambda v, f: _number(v, f, -1.0, 1.0),
        "long_range_stride": lambda v, f: _number(v, f, 1, 64, integer=True),
        "randomized_strides": _boolean,
        "foreground_threshold": lambda v, f: _number(v, f, 0.0, 1.0),
        "min_size": lambda v, f: _number(v, f, 0, 1_000_000, integer=True),
        "merge_distance": lambda v, f: _number(v, f, 0, 64, integer=True),
        "resolution": lambda v, f: _choice(v, f, tuple(COARSE_FACTORS)),
    }
    for key, value in decode.items():
        checks[key](value, f"decode.{key}")


def validate_input(rules: Any) -> None:
    """Input rules: channels, normalisation, percentiles, contrast floor, inversion."""
    rules = _section(rules, "input", {"channels", "normalization", "percentiles", "min_contrast_snr",
                                       "hot_pixel_margin", "invert"})
    if "channels" in rules:
        _number(rules["channels"], "input.channels", 1, MAX_IN_CHANNELS, integer=True)
    if "normalization" in rules:
        _choice(rules["normalization"], "input.normalization", NORMALIZATIONS)
    if "percentiles" in rules:
        p = rules["percentiles"]
        if not isinstance(p, list) or len(p) != 2:
            _fail("input.percentiles", f"must be a list of two numbers, got {p!r}")
        _number(p[0], "input.percentiles[0]", 0.0, 100.0)
        _number(p[1], "input.percentiles[1]", p[0], 100.0)
    for key in ("min_contrast_snr", "hot_pixel_margin"):
        if key in rules:
            _number(rules[key], f"input.{key}", 0.0, 1e6)
    if "invert" in rules:
        _boolean(rules["invert"], "input.invert")


def validate_offsets(offsets: Any, ndim: int) -> None:
    """2D: exactly the package's offsets; 3D: a list of nonzero (z, y, x) integer offsets (anisotropy changes z)."""
    if ndim == 2:
        if offsets != [list(o) for o in OFFSETS]:
            _fail("offsets", f"must be the package's affinity offsets {[list(o) for o in OFFSETS]}")
        return
    if not isinstance(offsets, list) or not 1 <= len(offsets) <= 64:
        _fail("offsets", f"must be a list of 1 to 64 offsets, got {offsets!r}")
    for i, offset in enumerate(offsets):
        if not isinstance(offset, list) or len(offset) != ndim or not any(offset):
            _fail(f"offsets[{i}]", f"must be a nonzero list of {ndim} integers, got {offset!r}")
        for a, v in enumerate(offset):
            _number(v, f"offsets[{i}][{a}]", -256, 256, integer=True)


def validate_metadata(meta: Any) -> None:
    """Raise SchemaError (naming the field) unless ``meta`` is safe to build and run a network from."""
    if not isinstance(meta, dict):
        raise SchemaError(f"metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("architecture") != "EmbeddingUNet":
        _fail("architecture", f"must be 'EmbeddingUNet', got {meta.get('architecture')!r}")
    if "format_version" in meta:
        _number(meta["format_version"], "format_version", 1, FORMAT_VERSION, integer=True)
    if "config" not in meta:
        _fail("config", "is missing")
    validate_config(meta["config"])
    if "decode" in meta:
        validate_decode(meta["decode"])
    if "input" in meta:
        validate_input(meta["input"])
    if "train_diameter" in meta:
        _number(meta["train_diameter"], "train_diameter", 1.0, 1000.0)
    if "embedding_dim" in meta and meta["embedding_dim"] != meta["config"].get("embedding_dim", 16):
        _fail("embedding_dim", f"({meta['embedding_dim']!r}) differs from config.embedding_dim")
    if "offsets" in meta:
        validate_offsets(meta["offsets"], meta["config"].get("ndim", 2))
    if "voxel_size" in meta:
        size = meta["voxel_size"]
        if not isinstance(size, list) or len(size) != 3:
            _fail("voxel_size", f"must be a list of 3 numbers (z, y, x), got {size!r}")
        for a, v in enumerate(size):
            _number(v, f"voxel_size[{a}]", 1e-9, 1e9)
    if "step" in meta:
        _number(meta["step"], "step", 0, 10**9, integer=True)
    if "name" in meta and not isinstance(meta["name"], str):
        _fail("name", f"must be a string, got {meta['name']!r}")
