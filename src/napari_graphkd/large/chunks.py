"""Chunk planning: a grid of core boxes per plane (2D) or volume (3D), each read with a halo, and the boxes where neighbours overlap.

A box is one (start, stop) pair per spatial axis, flattened: (y0, y1, x0, x1) for planes,
(z0, z1, y0, y1, x0, x1) for volumes (half-open, global pixel/voxel coordinates).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator

DEFAULT_CHUNK = 1024  # core chunk side in px: ~0.65 GB per student worker process (benchmarks/results/scale.md)
Box = tuple[int, ...]  # start, stop per spatial axis: y0, y1, x0, x1 or z0, z1, y0, y1, x0, x1


@dataclass(frozen=True)
class Chunk:
    """One unit of work: a core box of one plane or volume (written to the output) and its haloed box (segmented)."""

    plane: int
    position: tuple[int, ...]  # grid index per spatial axis
    core: Box
    outer: Box

    @property
    def row(self) -> int:
        """Grid row (y)."""
        return self.position[-2]

    @property
    def col(self) -> int:
        """Grid column (x)."""
        return self.position[-1]

    @property
    def key(self) -> str:
        """File-name-safe identifier, also the record name of a finished chunk."""
        return "_".join(str(i) for i in (self.plane, *self.position))

    def describe(self) -> str:
        """Human-readable location, for progress and error messages."""
        spans = [f"{a}:{b}" for a, b in zip(self.core[::2], self.core[1::2])]
        if len(spans) == 3:
            return f"chunk {self.key} (volume {self.plane}, planes {spans[0]}, rows {spans[1]}, cols {spans[2]})"
        return f"chunk {self.key} (plane {self.plane}, rows {spans[0]}, cols {spans[1]})"


def per_axis(value: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """``value`` for each of ``ndim`` axes (a number repeated, or a tuple as given)."""
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(f"expected {ndim} values (one per axis), got {tuple(value)}")
        return tuple(int(v) for v in value)
    return (int(value),) * ndim


@dataclass(frozen=True)
class ChunkPlan:
    """Core chunks of size ``chunk`` tiling ``planes`` images (or volumes) of ``shape``, each segmented with ``halo`` around it.

    ``chunk`` and ``halo`` are one number for every axis or one per axis (anisotropic volumes).
    """

    planes: int
    shape: tuple[int, ...]
    chunk: int | tuple[int, ...]
    halo: int | tuple[int, ...]

    @property
    def ndim(self) -> int:
        """2 for planes, 3 for volumes."""
        return len(self.shape)

    @property
    def sides(self) -> tuple[int, ...]:
        """Core chunk size per axis."""
        return per_axis(self.chunk, self.ndim)

    @property
    def halos(self) -> tuple[int, ...]:
        """Halo per axis."""
        return per_axis(self.halo, self.ndim)

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of chunks per axis (rows and columns of a plane; planes, rows and columns of a volume)."""
        return tuple(math.ceil(n / c) for n, c in zip(self.shape, self.sides))

    def at(self, plane: int, *position: int) -> Chunk:
        """The chunk at a grid position."""
        core, outer = [], []
        for i, n, c, m in zip(position, self.shape, self.sides, self.halos):
            lo, hi = i * c, min(i * c + c, n)
            core += [lo, hi]
            outer += [max(0, lo - m), min(n, hi + m)]
        return Chunk(plane, tuple(position), tuple(core), tuple(outer))

    def chunks(self) -> Iterator[Chunk]:
        """Every chunk, plane (volume) by plane in raster order (the order that fixes global ids)."""
        for p in range(self.planes):
            for position in itertools.product(*(range(g) for g in self.grid)):
                yield self.at(p, *position)

    def __len__(self) -> int:
        return self.planes * math.prod(self.grid)

    def neighbours(self, chunk: Chunk) -> Iterator[Chunk]:
        """The chunks of the same plane (volume) touching ``chunk`` by a side, an edge or a corner."""
        for step in itertools.product((-1, 0, 1), repeat=self.ndim):
            position = tuple(i + d for i, d in zip(chunk.position, step))
            if any(step) and all(0 <= i < g for i, g in zip(position, self.grid)):
                yield self.at(chunk.plane, *position)

    def neighbour_pairs(self) -> Iterator[tuple[Chunk, Chunk]]:
        """Each pair of chunks of one plane (volume) that touch by a side, an edge or a corner, once."""
        for chunk in self.chunks():
            for other in self.neighbours(chunk):
                if other.position > chunk.position:
                    yield chunk, other


def intersect(a: Box, b: Box) -> Box | None:
    """Intersection of two boxes, None when empty."""
    out = []
    for i in range(0, len(a), 2):
        lo, hi = max(a[i], b[i]), min(a[i + 1], b[i + 1])
        if lo >= hi:
            return None
        out += [lo, hi]
    return tuple(out)


def local(box: Box, origin: Box) -> tuple[slice, ...]:
    """Slices of ``box`` inside an array that covers ``origin``."""
    return tuple(slice(box[i] - origin[i], box[i + 1] - origin[i]) for i in range(0, len(box), 2))


def slices(box: Box) -> tuple[slice, ...]:
    """Slices selecting ``box`` in global coordinates."""
    return tuple(slice(box[i], box[i + 1]) for i in range(0, len(box), 2))


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= value."""
    return -(-int(value) // multiple) * multiple
