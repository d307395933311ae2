"""The one test of "is this JSON value a usable number", shared by every reader of coordinates.

JSON numbers reach us from prompt files, Label Studio regions and datasets as Python ints of any size, floats
(NaN and infinities included, which Python's json accepts) and bools (which are ints). `np.isfinite` raises
TypeError on an int beyond 64 bits and `math.isfinite` OverflowError on one beyond float range, so a check
written with either turns one hostile value into a crash of the whole run.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["is_finite_number"]


def is_finite_number(v: Any) -> bool:
    """An int or float (not a bool) with a finite float value; an integer beyond float range (10**400) is not."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False
