"""pipeline/images.py: the caller's max_pixels is the only pixel limit, whatever Pillow's own bomb limit is
(and while other decodes with other limits run in other threads), and 16-bit grey decodes in integers."""
from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from pipeline.images import TOO_LARGE, ImageDecodeError, decode_image, grey_to_8bit


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (w, h)).save(out, "PNG")
    return out.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h and whose pixel data is missing (cheap to make at any size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def test_a_limit_above_pillows_own_takes_effect():
    """The reported case: 15000 x 13000 = 195 M pixels under --max-pixels 300 M is decoded (here: found
    truncated), not refused as 'over the limit of 300000000'."""
    data = _png_header_only(15000, 13000)
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data, max_pixels=300_000_000)
    assert e.value.reason != TOO_LARGE, e.value.detail
    with pytest.raises(ImageDecodeError, match="195000000 pixels is over the limit of 100000000") as e:
        decode_image(data, max_pixels=100_000_000)
    assert e.value.reason == TOO_LARGE


@settings(max_examples=60, deadline=None)
@given(pillow=st.sampled_from([None, 1, 50, 89_478_485]), w=st.integers(1, 40), h=st.integers(1, 40),
       slack=st.integers(-50, 50), unlimited=st.booleans())
def test_only_the_callers_limit_decides(pillow, w, h, slack, unlimited):
    limit = None if unlimited else max(1, w * h + slack)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", pillow)
        try:
            decoded = decode_image(_png(w, h), max_pixels=limit)
        except ImageDecodeError as e:
            assert e.reason == TOO_LARGE and limit is not None and w * h > limit, e.detail
        else:
            assert decoded.shape == (h, w, 3) and (limit is None or w * h <= limit)
        assert Image.MAX_IMAGE_PIXELS == pillow  # put back as it was found


def test_overlapping_decodes_with_different_limits_each_keep_their_own(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    small, big = _png(20, 20), _png(60, 60)  # 400 and 3600 pixels

    def one(i: int) -> str:
        limit = (1000, 5000, None, 100)[i % 4]
        data = big if i % 3 else small
        try:
            decode_image(data, max_pixels=limit)
            return "ok"
        except ImageDecodeError as e:
            return e.reason

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(200)))
    for i, outcome in enumerate(outcomes):
        limit, pixels = (1000, 5000, None, 100)[i % 4], 3600 if i % 3 else 400
        assert outcome == (TOO_LARGE if limit is not None and pixels > limit else "ok"), (i, outcome)
    assert Image.MAX_IMAGE_PIXELS == 10


def _float_reference(arr: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """The float64 formula the integer one replaces."""
    a = arr.astype(np.float64)
    top = 65535.0 if sixteen_bit or a.max() > 255 else 255.0
    return np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)


@settings(max_examples=200, deadline=None)
@given(arr=hnp.arrays(st.sampled_from([np.dtype("<u2"), np.dtype(">u2")]), hnp.array_shapes(max_dims=2, max_side=30)))
def test_16_bit_grey_gives_the_float_formulas_bytes(arr):
    np.testing.assert_array_equal(grey_to_8bit(arr, True), _float_reference(arr, True))


@settings(max_examples=200, deadline=None)
@given(arr=hnp.arrays(np.int32, hnp.array_shapes(max_dims=2, max_side=30),
                      elements=st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(-300, 300))))
def test_32_bit_grey_gives_the_float_formulas_bytes(arr):
    np.testing.assert_array_equal(grey_to_8bit(arr, False), _float_reference(arr, False))


def test_16_bit_grey_decodes_without_float_copies():
    side = 1000
    values = (np.arange(side * side, dtype=np.uint32) * 37 % 65536).astype(np.uint16).reshape(side, side)
    out = io.BytesIO()
    Image.fromarray(values).save(out, "PNG")
    data = out.getvalue()
    tracemalloc.start()
    try:
        decoded = decode_image(data, max_pixels=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(decoded[:, :, 0], _float_reference(values, True))
    assert peak < 14 * side * side, f"{peak / side / side:.1f} bytes per pixel"  # float64 took over 24
