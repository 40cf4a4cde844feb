"""Automatic nucleus size: each image's typical nucleus diameter, read off its own segmentation.

The image is segmented at a guess of the diameter and the typical diameter of the objects found is
measured; where the two disagree by more than ``TOLERANCE`` it is segmented again at the measured
diameter (at most ``MAX_PASSES`` passes). Nuclei are a fixed point: their measured size hardly
depends on the diameter they were segmented at. The first guess is ``START`` times the training
diameter: a 2x smaller image is 4x cheaper to segment, and nuclei up to ~5x the training size are
still found whole there, whereas at the training size they shatter into training-sized fragments,
a false fixed point. The opposite false fixed point sits at the first guess: a model that cannot
resolve small nuclei at half scale finds training-sized blobs there (e.g. whole cells on
bright-field), and those measure the first guess. So a first guess accepted at once is checked by
one pass at ``PROBE`` times it: nuclei measure the same there, objects that follow the rescaling
do not, and the estimate continues from what the probe measured. Where no pass agrees with itself
(a model that sees no nucleus-like objects finds objects that grow with the rescaling), the image
is segmented at the training diameter.
A segmenter is a callable "segment at diameter d", so the estimate serves every model and the
classical pipeline alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import numpy as np

TOLERANCE = 0.15  # relative mismatch between the diameter used and the one measured that triggers another pass
MAX_PASSES = 3
START = 2.0  # first guess, in training diameters
PROBE = 0.6  # a first guess accepted at once is checked at this fraction of it
BOUNDS = (0.3, 5.0)  # estimates are clamped to this range of the training diameter (8-140 px at 28 px)
MIN_INTERIOR_OBJECTS = 5  # fewer objects away from the image border: border objects count too

T = TypeVar("T")


def equivalent_diameters(labels: np.ndarray, skip_border: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Equivalent diameters (px) and areas of the objects of a label image, optionally without those touching the border."""
    labels = np.asarray(labels)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    keep = areas > 0
    if skip_border:
        border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        interior = keep.copy()
        interior[np.unique(border)] = False
        if interior.sum() >= MIN_INTERIOR_OBJECTS:
            keep = interior
    areas = areas[keep].astype(np.float64)
    return np.sqrt(4.0 * areas / np.pi), areas


def typical_diameter(labels: np.ndarray) -> float | None:
    """Area-weighted median equivalent diameter of the objects (None without objects).

    Weighting by area makes crumbs and fragments of a shattered nucleus count for what they cover,
    so a few of them cannot pull the estimate down.
    """
    diameters, areas = equivalent_diameters(labels)
    if diameters.size == 0:
        return None
    order = np.argsort(diameters)
    cumulative = np.cumsum(areas[order])
    return float(diameters[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


@dataclass
class SizeEstimate(Generic[T]):
    """The diameter chosen for an image (None: no consistent size, segmented as trained), the segmentation made at it,
    and every (diameter used, diameter measured) pass."""

    diameter: float | None
    result: T
    passes: list[tuple[float, float | None]]


def _labels(result) -> np.ndarray:
    """Labels of a segmentation result (an array or an object with ``.labels``)."""
    return result if isinstance(result, np.ndarray) else result.labels


def estimate_diameter(segment_at: Callable[[float | None], T], train_diameter: float, *, start: float | None = None,
                      bounds: tuple[float, float] | None = None, tolerance: float = TOLERANCE,
                      max_passes: int = MAX_PASSES) -> SizeEstimate[T]:
    """Segment at ``start`` (default ``START`` training diameters), then at the measured diameter until the two agree.

    Returns the first self-consistent pass (a pass clamped to ``BOUNDS`` that measures beyond them
    counts as consistent); with none, ``segment_at(None)`` (as trained) and diameter None. Where
    the default first guess finds nothing, the estimate goes on from the training diameter. The
    default first guess, when accepted at once, must measure the same at ``PROBE`` times it
    (one more pass, beyond ``max_passes``); otherwise the estimate goes on from the probe. A
    measured diameter within ``tolerance`` of the training diameter is segmented at the training
    diameter: a rescaling that small would only cost interpolation. ``bounds`` (px) replace
    ``BOUNDS`` where the image limits the rescaling.
    """
    lo, hi = bounds or (BOUNDS[0] * train_diameter, BOUNDS[1] * train_diameter)
    diameter = float(np.clip(start if start else START * train_diameter, lo, hi))
    agree = np.log1p(tolerance)
    passes: list[tuple[float, float | None]] = []
    limit = max_passes
    while len(passes) < limit:
        result = segment_at(diameter)
        measured = typical_diameter(_labels(result))
        passes.append((diameter, measured))
        if measured is None and not start and len(passes) == 1 and diameter != train_diameter:
            diameter = float(train_diameter)  # nothing at the default first guess (small nuclei): go on from here
            continue
        if measured is None:
            break
        beyond = (diameter == hi and measured >= hi) or (diameter == lo and measured <= lo)
        consistent = beyond or abs(np.log(measured / diameter)) <= agree
        if consistent and (start or len(passes) > 1 or diameter * PROBE < lo):
            return SizeEstimate(diameter, result, passes)
        if consistent:  # the default first guess, accepted at once: probe below it
            probe, limit = float(diameter * PROBE), limit + 1
            probed = segment_at(probe)
            at_probe = typical_diameter(_labels(probed))
            passes.append((probe, at_probe))
            if at_probe is None or abs(np.log(at_probe / measured)) <= agree:  # the same objects: real nuclei
                return SizeEstimate(diameter, result, passes)
            if abs(np.log(at_probe / probe)) <= agree:
                return SizeEstimate(probe, probed, passes)
            measured = at_probe
        diameter = float(np.clip(measured, lo, hi))
        if abs(np.log(diameter / train_diameter)) <= agree:
            diameter = float(train_diameter)
    result = segment_at(None)  # as trained (a cache keyed by the decision then holds this very pass)
    passes.append((float(train_diameter), typical_diameter(_labels(result))))
    return SizeEstimate(None, result, passes)

