"""Decoding a request body as JSON without letting its shape fault the server.

`json.loads` recurses once per nesting level (a deeply nested body raises RecursionError), accepts
NaN/Infinity, and returns strings holding lone surrogates (`"\\ud800"`) that later fail to encode.
`parse_json` refuses all of these as 400s before anything reads the value.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from .protocol import ProtocolError

MAX_DEPTH = 64  # Label Studio's deepest bodies (tasks > predictions > result > value > rle) nest about 8 deep
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def nesting_depth(raw: bytes) -> int:
    """Deepest nesting of arrays/objects in JSON text (brackets inside strings do not count)."""
    arr = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    step = (np.isin(arr, (ord("["), ord("{"))).astype(np.int64) - np.isin(arr, (ord("]"), ord("}"))))
    return int(np.cumsum(step).max(initial=0))


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(x for x in v if isinstance(x, (str, list, dict)))
    return False


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """`raw` decoded as JSON; ProtocolError(400) for anything but well-formed, finite, valid-Unicode JSON."""
    if not raw.strip():
        raise ProtocolError(400, "request body is empty; expected JSON")
    if nesting_depth(raw) > max_depth:
        raise ProtocolError(400, f"request body nests deeper than {max_depth} levels")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise ProtocolError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # bad encodings, NaN, 5000-digit integers
        reason = "it is not UTF-8" if isinstance(e, UnicodeDecodeError) else str(e)[:120]
        raise ProtocolError(400, f"request body is not valid JSON: {reason}") from None
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(value):
        raise ProtocolError(400, "request body holds a string with an unpaired UTF-16 surrogate escape")
    return value
