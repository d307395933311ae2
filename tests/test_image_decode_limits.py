"""pipeline/images.py: the caller's max_pixels is the only pixel limit, whatever Pillow's own bomb limit is
(and while other decodes with other limits run in other threads), 16-bit grey decodes in integers, and only
the formats the project lists as images are opened."""
from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from pipeline.images import (
    FORMAT_EXTENSIONS,
    IMAGE_FORMATS,
    NOT_AN_IMAGE,
    TOO_LARGE,
    ImageDecodeError,
    decode_image,
    grey_to_8bit,
)
from pipeline.sources import IMAGE_EXTENSIONS


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


# --- only the formats the project lists as images are opened ---------------------------------------

_EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
        b"newpath 0 0 moveto 10 10 lineto stroke showpage\n%%EOF\n")


def _saved_in_every_other_format() -> dict[str, bytes]:
    """An 8x8 RGB (or greyscale, or 1-bit) image saved in each format Pillow can write that the project does not
    list as an image. MPO is left out: its files are JPEG streams, decoded as the JPEG they are."""
    Image.init()
    out = {"EPS (hand-written)": _EPS}
    for fmt in sorted(set(Image.SAVE) - set(IMAGE_FORMATS) - {"MPO"}):
        for mode in ("RGB", "L", "1"):
            buf = io.BytesIO()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # IM: deprecated, still readable
                    Image.new(mode, (8, 8), 1).save(buf, fmt)
            except Exception:  # noqa: BLE001 - this format cannot hold this mode, or needs a missing codec
                continue
            out[fmt] = buf.getvalue()
            break
    return out


def test_the_allowed_formats_are_the_listed_image_extensions():
    """One list: `IMAGE_EXTENSIONS` (what a listing takes as an image) is made from `FORMAT_EXTENSIONS`, and
    Pillow maps each of those extensions to the format it names."""
    Image.init()
    assert IMAGE_EXTENSIONS == tuple(e for exts in FORMAT_EXTENSIONS.values() for e in exts)
    assert set(IMAGE_FORMATS) == set(FORMAT_EXTENSIONS)
    for fmt, extensions in FORMAT_EXTENSIONS.items():
        assert all(Image.registered_extensions()[e] == fmt for e in extensions), fmt
        data = io.BytesIO()
        Image.new("RGB", (8, 8), (9, 8, 7)).save(data, fmt)
        assert decode_image(data.getvalue()).shape == (8, 8, 3), fmt


def test_every_other_format_pillow_knows_is_not_an_image_and_never_reaches_its_plugin(monkeypatch):
    """Bytes may come from whoever made a task (the backend's and pre-annotation's on-demand encode share this
    decoder): an EPS named .png went to Pillow's EPS plugin and on to Ghostscript. Now no plugin outside the
    allow-list is even asked to open the bytes; each is `not_an_image`."""
    others = _saved_in_every_other_format()
    assert {"EPS (hand-written)", "PPM", "TGA", "PCX", "ICO", "PDF"} <= set(others)
    for fmt in list(Image.OPEN):
        if fmt not in IMAGE_FORMATS:
            monkeypatch.setitem(Image.OPEN, fmt, (_refuse_plugin(fmt), None))
    for fmt, data in others.items():
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data)
        assert info.value.reason == NOT_AN_IMAGE, (fmt, info.value)
        assert "JPEG, PNG, BMP, TIFF, WEBP, GIF" in info.value.detail


def _refuse_plugin(fmt: str):
    def factory(*_args, **_kwargs):
        raise AssertionError(f"Pillow's {fmt} plugin was asked to open the bytes")
    return factory
