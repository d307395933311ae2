"""COCO run-length encodings, read and checked before pycocotools sees them.

pycocotools trusts an RLE's counts: counts that do not cover the image leave pixels uninitialised or write past
its buffer, and a malformed compressed string gives garbage. Every reader of COCO masks (pre-annotation prompts,
evaluation datasets, training data) checks counts here first and turns `RLEError` into its own error type.
"""
from __future__ import annotations

import numbers


class RLEError(ValueError):
    """An RLE whose counts are malformed or do not cover the image."""


def string_counts(text: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string, read as pycocotools reads it: 5 bits a character from
    '0' (0x20: more follow; 0x10 on the last: negative), at most 6 characters a number (pycocotools shifts a
    32-bit int), and runs from the fourth on as deltas to the run two before.

    RLEError for a character outside the code, a number too long, or a string that ends inside a number."""
    out: list[int] = []
    value = shift = 0
    for n, ch in enumerate(text):
        c = ord(ch) - 48
        if not 0 <= c < 64 or shift >= 30:
            raise RLEError(f"not a COCO compressed RLE string: {ch!r} at position {n}")
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value -= 1 << shift
        out.append(value + out[-2] if len(out) > 2 else value)
        value = shift = 0
    if shift:
        raise RLEError("not a COCO compressed RLE string: it ends inside a run length")
    return out


def checked_counts(counts: object, height: int, width: int) -> list[int]:
    """The run lengths of `counts` (a compressed string or a list of integers), once they are non-negative
    integers that cover a height x width image exactly; RLEError otherwise."""
    if isinstance(counts, str):
        runs = string_counts(counts)
    elif isinstance(counts, list):
        bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
        if bad:
            raise RLEError(f"RLE counts must be integers, got {str(bad[0])[:40]}")
        runs = [int(c) for c in counts]
    else:
        raise RLEError(f"RLE counts must be a list of run lengths or a COCO compressed string, "
                       f"got {type(counts).__name__}")
    if any(r < 0 for r in runs):
        raise RLEError(f"RLE counts must be non-negative, got {min(runs)}")
    if sum(runs) != height * width:
        raise RLEError(f"RLE counts sum to {sum(runs)} pixels, the {width}x{height} image has {height * width}")
    return runs
