"""Decoding a request body as JSON without letting its shape fault the server.

`json.loads` recurses once per nesting level (a deeply nested body raises RecursionError), accepts
NaN/Infinity, UTF-16 and UTF-32 bodies, and returns strings holding lone surrogates (`"\\ud800"`) that
later fail to encode. `parse_json` accepts UTF-8 only (RFC 8259 for JSON between systems; Label Studio
sends UTF-8), so the byte-level checks below see the text as it is, and refuses all of these as 400s
before anything reads the value.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from .protocol import ProtocolError

MAX_DEPTH = 64  # Label Studio's deepest bodies (tasks > predictions > result > value > rle) nest about 8 deep
# A string from its opening quote to its closing one or, unterminated, to the end of the body. Every match
# attempt succeeds without backtracking (possessive runs, an escape is one fixed step), so stripping strings is
# linear in the body whatever it holds: a pattern that must find the closing quote fails at each of the n quotes
# of a never-closed `"\\"\\"\\"...` only after scanning to the end, O(n^2) with the GIL held.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = np.zeros(256, dtype=np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1
_CHUNK = 1 << 20  # brackets summed at a time: the depth costs a few MiB whatever the body's size


def nesting_depth(raw: bytes) -> int:
    """Deepest nesting of arrays/objects in UTF-8 JSON text (brackets inside strings do not count; an
    unterminated string runs to the end). Linear in `len(raw)` for any bytes.

    The brackets left once strings are removed are summed a chunk at a time in small integers, so the
    memory used is at most twice the body plus a few MiB."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = peak = 0
    for start in range(0, len(brackets), _CHUNK):
        chunk = np.frombuffer(brackets, dtype=np.uint8, count=min(_CHUNK, len(brackets) - start), offset=start)
        levels = np.cumsum(_STEP[chunk], dtype=np.int32)
        peak = max(peak, depth + int(levels.max()))
        depth += int(levels[-1])
    return peak


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
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(400, f"request body is not UTF-8 (invalid byte at offset {e.start}); send JSON as "
                                 "UTF-8") from None
    if b"\x00" in raw:  # never in JSON text; every other byte of UTF-16, 3 of 4 of UTF-32 for ASCII
        raise ProtocolError(400, "request body is not UTF-8 (it holds NUL bytes: UTF-16 or UTF-32?); send JSON "
                                 "as UTF-8")
    if nesting_depth(raw) > max_depth:
        raise ProtocolError(400, f"request body nests deeper than {max_depth} levels")
    try:
        value = json.loads(text.removeprefix("\ufeff"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise ProtocolError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    except (ValueError, RecursionError) as e:  # NaN, 5000-digit integers
        raise ProtocolError(400, f"request body is not valid JSON: {str(e)[:120]}") from None
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(value):
        raise ProtocolError(400, "request body holds a string with an unpaired UTF-16 surrogate escape")
    return value
