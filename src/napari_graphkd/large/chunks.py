"""Chunk planning: a grid of core boxes per plane, each read with a halo, and the boxes where neighbours overlap."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

DEFAULT_CHUNK = 1024  # core chunk side in px: ~0.65 GB per student worker process (benchmarks/results/scale.md)
Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open, global pixel coordinates)


@dataclass(frozen=True)
class Chunk:
    """One unit of work: a core box of one plane (written to the output) and its haloed box (segmented)."""

    plane: int
    row: int
    col: int
    core: Box
    outer: Box

    @property
    def key(self) -> str:
        """File-name-safe identifier, also the record name of a finished chunk."""
        return f"{self.plane}_{self.row}_{self.col}"

    def describe(self) -> str:
        """Human-readable location, for progress and error messages."""
        y0, y1, x0, x1 = self.core
        return f"chunk {self.key} (plane {self.plane}, rows {y0}:{y1}, cols {x0}:{x1})"


@dataclass(frozen=True)
class ChunkPlan:
    """Core chunks of size ``chunk`` tiling ``planes`` images of ``shape``, each segmented with ``halo`` px around it."""

    planes: int
    shape: tuple[int, int]
    chunk: int
    halo: int

    @property
    def grid(self) -> tuple[int, int]:
        """Number of chunk rows and columns per plane."""
        return math.ceil(self.shape[0] / self.chunk), math.ceil(self.shape[1] / self.chunk)

    def at(self, plane: int, row: int, col: int) -> Chunk:
        """The chunk at a grid position."""
        (h, w), c, m = self.shape, self.chunk, self.halo
        y0, x0 = row * c, col * c
        y1, x1 = min(y0 + c, h), min(x0 + c, w)
        return Chunk(plane, row, col, (y0, y1, x0, x1), (max(0, y0 - m), min(h, y1 + m), max(0, x0 - m), min(w, x1 + m)))

    def chunks(self) -> Iterator[Chunk]:
        """Every chunk, plane by plane in raster order (the order that fixes global ids)."""
        rows, cols = self.grid
        for p in range(self.planes):
            for r in range(rows):
                for c in range(cols):
                    yield self.at(p, r, c)

    def __len__(self) -> int:
        rows, cols = self.grid
        return self.planes * rows * cols

    def neighbour_pairs(self) -> Iterator[tuple[Chunk, Chunk]]:
        """Each pair of chunks of one plane that touch by a side or a corner, once."""
        rows, cols = self.grid
        for chunk in self.chunks():
            for dr, dc in ((0, 1), (1, -1), (1, 0), (1, 1)):
                r, c = chunk.row + dr, chunk.col + dc
                if 0 <= r < rows and 0 <= c < cols:
                    yield chunk, self.at(chunk.plane, r, c)


def intersect(a: Box, b: Box) -> Box | None:
    """Intersection of two boxes, None when empty."""
    y0, y1, x0, x1 = max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3])
    return (y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None


def local(box: Box, origin: Box) -> tuple[slice, slice]:
    """Slices of ``box`` inside an array that covers ``origin``."""
    return slice(box[0] - origin[0], box[1] - origin[0]), slice(box[2] - origin[2], box[3] - origin[2])


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= value."""
    return -(-int(value) // multiple) * multiple
