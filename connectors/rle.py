"""Label Studio brush RLE for binary masks: label-studio-sdk's format, encoded with numpy.

Label Studio draws a brush region from a run-length code of its RGBA pixels; a pixel is visible when
its alpha is 255, so a mask is encoded as uint8 0/255 in all four channels (a 0/1 mask round-trips
but is invisible). The format, as written by `label_studio_sdk.converter.brush.encode_rle`:

- header: value count (32 bits), word size - 1 (5 bits, = 7), the four run-length field widths - 1
  (4 bits each; widths 3, 4, 8, 16);
- per run: '1' (a series), a 2-bit index of the smallest width that holds length - 1 (the 16-bit
  field for runs over 256 values, in pieces of 65536), length - 1, then the 8-bit value;
- zero bits up to the next byte boundary (a full zero byte when already aligned), read as bytes.

The SDK builds this bit by bit in Python strings (10-25 ms for a 480x640 mask here, more under load,
a sizeable share of a click); this encoder does it with array operations in well under a millisecond
and gives the SDK's output byte for byte (tests/test_backend_rle.py), decoded by the SDK's decoder.

RLE from a request is decoded here too, not with the SDK, whose decoder first expands the whole byte
list into a bit string (~64 bytes of Python objects per byte) whatever the header says. This decoder
refuses a stream longer than any valid stream for its header, stops at a pixel that is not set when asked
whether the mask covers it, and spends a `DecodeBudget`: one unit per record and per literal value, so the
work one request can cause is capped however its bytes are arranged.
Its output equals the SDK decoder's on every stream the SDK decodes (tests/test_backend_rle.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

_WIDTHS = np.array([3, 4, 8, 16])
_PIECE = 1 << 16  # the 16-bit length field holds at most 65536 values per piece
_HEADER_BITS = np.array([int(b) for b in "00111" + "".join(f"{w - 1:04b}" for w in _WIDTHS)], dtype=np.uint8)


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encode a 2-D mask (bool, or numbers where non-zero means foreground) as Label Studio brush RLE."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError("mask is empty")
    flat = (mask != 0).ravel()
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.append(starts, flat.size)).astype(np.int64) * 4  # RGBA: every pixel 4 times
    values = np.where(flat[starts], 255, 0).astype(np.int64)

    # Runs longer than 65536 values are written as full 65536-value pieces and a remainder.
    extra = np.where(lengths > _PIECE, (lengths - 1) // _PIECE, 0)
    run = np.repeat(np.arange(lengths.size), extra + 1)
    piece = np.arange(run.size) - np.repeat(np.cumsum(extra + 1) - (extra + 1), extra + 1)
    count = np.where(piece == extra[run], lengths[run] - extra[run] * _PIECE, _PIECE) - 1
    field = np.where(lengths[run] > 256, 3, np.searchsorted([7, 15, 255], count))  # index of the width
    width = _WIDTHS[field]
    code = ((((0b100 | field) << width) | count) << 8) | values[run]
    nbits = 3 + width + 8

    span = np.arange(int(nbits.max()))
    bits = (code[:, None] >> (nbits[:, None] - 1 - span)) & 1
    body = bits[span < nbits[:, None]].astype(np.uint8)
    total = np.array([int(b) for b in f"{flat.size * 4:032b}"], dtype=np.uint8)
    stream = np.concatenate((total, _HEADER_BITS, body))
    stream = np.concatenate((stream, np.zeros(8 - stream.size % 8, dtype=np.uint8)))
    return np.packbits(stream).tolist()


_HEADER_LEN = 53  # bits: value count (32), word size - 1 (5), four field widths - 1 (4 each)


class RleError(ValueError):
    """An RLE that is not a brush mask of the expected size, or that costs more than its budget to decode."""


@dataclass
class DecodeBudget:
    """Decoding work one caller may still spend: one unit per record and per literal value read."""

    left: int
    spent: int = 0

    def spend(self, units: int) -> None:
        if units > self.left:
            self.left = 0
            raise RleError("RLE takes more work to decode than this request may spend")
        self.left -= units
        self.spent += units


@dataclass(frozen=True)
class _Stream:
    data: bytes
    count: int  # values (4 per pixel)
    word: int  # bits per value
    widths: tuple[int, ...]  # bits of the four run-length fields


def max_rle_bytes(count: int, word: int = 8, widths: tuple[int, ...] = tuple(_WIDTHS.tolist())) -> int:
    """The longest stream that can be valid for a header of `count` values: one record per value, each with
    the widest length field, then the padding (the SDK's encoder pads to the next byte, a whole zero byte
    when already aligned)."""
    return (_HEADER_LEN + count * (3 + max(widths) + word)) // 8 + 1


def _read(data: bytes, pos: int, nbits: int) -> int:
    end = pos + nbits
    if end > len(data) * 8:
        raise RleError("RLE ends before its last value")
    first, last = pos >> 3, (end + 7) >> 3
    return (int.from_bytes(data[first:last], "big") >> ((last << 3) - end)) & ((1 << nbits) - 1)


def _stream(rle, height: int, width: int) -> _Stream:
    """The header of `rle`, checked against the (H, W) mask it must be and its length against the header."""
    arr = np.asarray(rle)
    if arr.ndim != 1 or arr.size < 7 or arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255:
        raise RleError("RLE must be a list of bytes (0-255) at least as long as its 7-byte header")
    data = arr.astype(np.uint8).tobytes()
    count = _read(data, 0, 32)
    if count != height * width * 4:
        raise RleError(f"RLE holds {count // 4} pixels, expected {height}x{width} = {height * width}")
    word = _read(data, 32, 5) + 1
    widths = tuple(_read(data, 37 + 4 * k, 4) + 1 for k in range(4))
    if word > 8:
        raise RleError(f"RLE values are {word} bits wide; brush masks have 8-bit values")
    longest = max_rle_bytes(count, word, widths)
    if len(data) > longest:
        raise RleError(f"RLE is {len(data)} bytes long; a {height}x{width} mask needs at most {longest}")
    return _Stream(data, count, word, widths)


def _records(s: _Stream, stop: int, budget: DecodeBudget | None) -> Iterator[tuple[int, int, int | np.ndarray]]:
    """(first value index, end index, value or literal values) of each record, until value `stop` is read.

    A record's head, length and (for a series) value take at most 3 + 16 + 8 bits, so one 40-bit window read
    at the record's first byte holds them all."""
    data, nbits = s.data + bytes(5), len(s.data) * 8  # zero padding: a window never runs off the end
    word_mask = (1 << s.word) - 1
    pos, i = _HEADER_LEN, 0
    while i < stop:
        window = int.from_bytes(data[pos >> 3:(pos >> 3) + 5], "big")
        left = 40 - (pos & 7) - 3  # bits of the window after the record's head
        head = (window >> left) & 7
        field = s.widths[head & 3]
        left -= field
        end = i + 1 + ((window >> left) & ((1 << field) - 1))
        if head >> 2:  # a series: one value repeated
            pos += 3 + field + s.word
            if pos > nbits:
                raise RleError("RLE ends before its last value")
            if budget is not None:
                budget.spend(1)
            yield i, min(end, s.count), (window >> (left - s.word)) & word_mask
        else:  # a literal: end - i values, one after the other
            n, start = end - i, pos + 3 + field
            pos = start + n * s.word
            if end > s.count or pos > nbits:
                raise RleError("RLE holds more values than its header counts, or ends before its last value")
            if budget is not None:
                budget.spend(1 + n)
            first = start >> 3
            bits = np.unpackbits(np.frombuffer(s.data, np.uint8, count=((pos + 7) >> 3) - first, offset=first))
            bits = bits[start - (first << 3):pos - (first << 3)]
            yield i, end, bits.reshape(n, s.word) @ (1 << np.arange(s.word - 1, -1, -1))
        i = end


def rle_to_mask(rle, height: int, width: int, budget: DecodeBudget | None = None,
                covering: tuple[int, int] | None = None) -> np.ndarray | None:
    """Decode Label Studio brush RLE into a bool (H, W) mask (alpha > 127); RleError if it is not one.

    The header's value count is checked first and the stream's length against it, so an RLE from a request
    cannot make the decoder allocate more than the (H, W) mask it claims to be. With `covering` (row, col),
    decoding stops at that pixel and answers None when it is not set."""
    s = _stream(rle, height, width)
    target = -1
    if covering is not None:
        row, col = covering
        if not (0 <= row < height and 0 <= col < width):
            raise RleError(f"pixel ({row}, {col}) is outside the {height}x{width} mask")
        target = (row * width + col) * 4 + 3  # the pixel's alpha
    out = np.zeros(s.count, dtype=np.uint8)
    for i, end, value in _records(s, s.count, budget):
        out[i:end] = value
        if i <= target < end:
            if out[target] <= 127:
                return None
            target = -1
    return out.reshape(height, width, 4)[:, :, 3] > 127
