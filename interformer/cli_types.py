"""Argument types for every command line: numbers with their allowed range, checked when the line is parsed.

A count of -1, a threshold of 1.5 or a NaN would otherwise pass argparse's `int`/`float` and surface later as
a traceback inside a Ray worker, or worse as a run that silently does something else (a negative --limit
slices images off the end). Each type names its range in the parser's error, and dataclass configs declare
theirs as field metadata (`range`), checked by `range_problems` however the config was built:

    argument --limit: must be an integer >= 1, got '-1'
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any, Callable


class NumberType:
    """An argparse `type` that parses an int or a finite float and checks it against a range."""

    def __init__(self, kind: type, minimum: float | None, maximum: float | None, above: float | None) -> None:
        self.kind, self.minimum, self.maximum, self.above = kind, minimum, maximum, above

    def describe(self) -> str:
        name = "an integer" if self.kind is int else "a number"
        bounds = []
        if self.above is not None:
            bounds.append(f"> {self.above:g}")
        if self.minimum is not None:
            bounds.append(f">= {self.minimum:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        return f"{name} {' and '.join(bounds)}" if bounds else name

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        if ((self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum)
                or (self.above is not None and value <= self.above)):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value

    def __repr__(self) -> str:  # argparse names the type in some messages
        return self.describe()


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An int within [minimum, maximum] (either end open when None)."""
    return NumberType(int, minimum, maximum, None)


def real(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None
         ) -> Callable[[str], float]:
    """A finite float within [minimum, maximum], and greater than `above` when given (NaN and inf refused)."""
    return NumberType(float, minimum, maximum, above)


COUNT = integer(1)             # how many of something: images, workers, clicks, actors
SEED = integer(0, 2**32 - 1)   # what numpy, torch and Python's random all accept
POSITIVE = real(above=0)       # sizes in MiB, CPU shares, seconds
FRACTION = real(0, 1)          # IoU targets, probability thresholds


def range_problems(config: Any) -> list[str]:
    """What breaks the `range` (a NumberType) that each field of a dataclass declares in its metadata, nested
    dataclasses and tuple fields included: the same check whether the values came from a command line, a JSON
    file or Python code."""
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            problems += range_problems(value)
            continue
        kind = f.metadata.get("range")
        if kind is None or value is None:
            continue
        for item in value if isinstance(value, tuple) else (value,):
            try:
                kind(repr(item))
            except argparse.ArgumentTypeError as e:
                problems.append(f"{f.name} {e}")
    return problems


def absolute_folder(value: str) -> str:
    """An argparse `type` for a local folder that other processes use too (Ray workers and actors run in other
    working directories): `~` expanded and made absolute against this process's working directory."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must be a folder path, got an empty string")
    return os.path.abspath(os.path.expanduser(value))
