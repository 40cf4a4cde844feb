"""Which axes of an image array are planes: the one stack rule of every path (pipeline, chunked, widgets).

Free of torch, so that code which never runs a network (the chunked driver) reads shapes the same way.
"""
from __future__ import annotations

from typing import Sequence

from .preprocess import InputError

MAX_CHANNELS = 8  # a last axis this short holds channels (a plane needs more pixels per side)
MAX_STACK_AXES = 2  # (T, Z) in front of the planes


def plane_layout(shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(stack shape, plane shape) of an image array: the one rule for which axes are planes.

    A last axis of at most MAX_CHANNELS holds channels (RGB(A) or multi-channel, converted per plane);
    the two axes before it (or the last two) are a plane; up to two axes in front, (Z,) or (T, Z),
    are a stack segmented plane by plane. A channel-first array (C,Y,X) is a stack of C planes.
    """
    shape = tuple(int(n) for n in shape)
    plane_ndim = 3 if len(shape) >= 3 and shape[-1] <= MAX_CHANNELS else 2
    stack = shape[: max(0, len(shape) - plane_ndim)]
    if len(shape) < 2 or len(stack) > MAX_STACK_AXES:
        raise InputError(f"cannot segment an image of shape {shape}: expected (Y,X), (Z,Y,X) or (T,Z,Y,X), "
                         f"optionally with up to {MAX_CHANNELS} channels last")
    return stack, shape[len(stack):]
