"""Brush RLE: our numpy encoder against label-studio-sdk's own encoder (byte for byte) and decoder, and our
decoder (the one requests' RLE goes through) against the SDK's on any stream, with its cost bounds."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter import brush

from connectors.rle import DecodeBudget, RleError, mask_to_rle, max_rle_bytes, rle_to_mask


@pytest.mark.parametrize("shape", [(1, 1), (48, 64), (37, 91), (96, 128)])
def test_round_trip_through_sdk_decoder(shape):
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) > 0.6
    mask[: shape[0] // 2, : shape[1] // 3] = True  # long runs as well as salt-and-pepper
    rle = mask_to_rle(mask)
    rgba = brush.decode_rle(rle).reshape(shape[0], shape[1], 4)
    assert set(np.unique(rgba[:, :, 3])) <= {0, 255}
    np.testing.assert_array_equal(rgba[:, :, 3] == 255, mask)
    np.testing.assert_array_equal(rle_to_mask(rle, *shape), mask)


def sdk_masks():
    rng = np.random.default_rng(7)
    yield np.zeros((1, 1), bool)
    yield np.ones((3, 5), bool)
    yield np.zeros((300, 300), bool)  # one run of 360000 values: 16-bit pieces of 65536 and a remainder
    yield np.ones((128, 128), bool)  # exactly one 65536-value piece
    for shape in [(1, 7), (2, 2), (48, 64), (37, 91), (120, 160)]:
        yield rng.random(shape) > 0.5  # runs of 1-4 pixels
        stripes = np.zeros(shape, bool)
        stripes[:, ::5] = True  # runs of 4 and 16 values
        yield stripes
        block = np.zeros(shape, bool)
        block[shape[0] // 3:, : shape[1] // 2] = True
        yield block
    for length in (1, 2, 3, 4, 5, 63, 64, 65, 16383, 16384, 16385):  # run lengths around every field width
        flat = np.zeros(40000, bool)
        flat[100 : 100 + length] = True
        yield flat.reshape(200, 200)


@pytest.mark.parametrize("mask", list(sdk_masks()), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_identical_to_the_sdk_encoder(mask):
    assert mask_to_rle(mask) == brush.mask2rle(mask.astype(np.uint8) * 255)


def test_every_channel_is_255_on_the_mask_so_label_studio_draws_it():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:7] = True
    rgba = brush.decode_rle(mask_to_rle(mask)).reshape(8, 8, 4)
    for c in range(4):
        np.testing.assert_array_equal(rgba[:, :, c], np.where(mask, 255, 0))


@pytest.mark.parametrize("values", [(False, True), (0, 1), (0, 255), (0.0, 0.7)])
def test_any_nonzero_dtype_becomes_opaque_foreground(values):
    mask = np.array([[values[0], values[1]], [values[1], values[0]]])
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(mask), 2, 2), mask != 0)


def test_empty_and_full_masks():
    for fill in (False, True):
        mask = np.full((30, 40), fill)
        np.testing.assert_array_equal(rle_to_mask(mask_to_rle(mask), 30, 40), mask)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 3), bool))
    with pytest.raises(ValueError, match="empty"):
        mask_to_rle(np.zeros((0, 5), bool))
    with pytest.raises(ValueError, match="expected 3x3"):
        rle_to_mask(mask_to_rle(np.zeros((2, 2), bool)), 3, 3)


# --------------------------------------------------------------------------------------------------
# The decoder of request RLE: the SDK's output on any stream it decodes, at a bounded cost

_FIELD_WIDTHS = (3, 4, 8, 16)


@st.composite
def streams(draw) -> tuple[list[int], int, int]:
    """A brush RLE stream of an (H, W) image built record by record, as any encoder may write it: series and
    literal records, any length field that holds the length (not only the smallest), then the padding."""
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    total, done, bits = h * w * 4, 0, []
    while done < total:
        n = draw(st.integers(1, min(total - done, 300)))
        field = draw(st.sampled_from([k for k, width in enumerate(_FIELD_WIDTHS) if n - 1 < 1 << width]))
        literal = draw(st.booleans()) and n <= 40
        head = f"{0 if literal else 1}{field:02b}{n - 1:0{_FIELD_WIDTHS[field]}b}"
        values = draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)) if literal else [draw(st.integers(0, 255))]
        bits.append(head + "".join(f"{v:08b}" for v in values))
        done += n
    stream = f"{total:032b}00111" + "".join(f"{width - 1:04b}" for width in _FIELD_WIDTHS) + "".join(bits)
    stream += "0" * (8 - len(stream) % 8)
    return [int(stream[i:i + 8], 2) for i in range(0, len(stream), 8)], h, w


@settings(max_examples=300, deadline=None)
@given(streams(), st.data())
def test_the_decoder_gives_the_sdk_decoders_mask_on_any_stream(stream, data):
    rle, h, w = stream
    expected = brush.decode_rle(rle).reshape(h, w, 4)[:, :, 3] > 127
    budget = DecodeBudget(10**6)
    np.testing.assert_array_equal(rle_to_mask(rle, h, w, budget), expected)
    assert 0 < budget.spent <= h * w * 4 * 2  # one unit per record and per literal value
    row, col = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    found = rle_to_mask(rle, h, w, covering=(row, col))
    assert (found is None) == (not expected[row, col])
    if found is not None:
        np.testing.assert_array_equal(found, expected)


@settings(max_examples=100, deadline=None)
@given(streams(), st.integers(1, 2000), st.integers(0, 255))
def test_an_rle_longer_than_any_valid_stream_for_its_header_is_refused_before_decoding(stream, extra, fill):
    rle, h, w = stream
    longest = max_rle_bytes(h * w * 4)
    budget = DecodeBudget(10**6)
    too_long = rle + [fill] * (longest - len(rle) + extra)
    with pytest.raises(RleError, match="bytes long"):
        rle_to_mask(too_long, h, w, budget)
    assert budget.spent == 0  # not one record read


def test_trailing_bytes_after_the_last_value_are_never_read():
    rle = mask_to_rle(np.zeros((64, 96), bool))
    padded = rle + [0] * (max_rle_bytes(64 * 96 * 4) - len(rle))  # as long as a valid stream can be
    budget = DecodeBudget(10**6)
    assert not rle_to_mask(padded, 64, 96, budget).any()
    assert budget.spent == 1  # one series record covers the 24576 values; the rest is never walked
    with pytest.raises(RleError, match="bytes long"):  # the auditor's 64x96 header + 1M zero bytes
        rle_to_mask(rle + [0] * 1_000_000, 64, 96)


def test_decoding_stops_at_its_budget_and_at_an_unset_click():
    mask = np.zeros((40, 50), bool)
    mask[:, ::2] = True  # 1000 runs of one pixel
    rle = mask_to_rle(mask)
    budget = DecodeBudget(100)
    with pytest.raises(RleError, match="more work"):
        rle_to_mask(rle, 40, 50, budget)
    assert budget.spent == 100 and budget.left == 0
    with pytest.raises(RleError):
        rle_to_mask(rle, 40, 50, budget)  # a spent budget refuses the next record at once
    early = DecodeBudget(10**6)
    assert rle_to_mask(rle, 40, 50, early, covering=(0, 1)) is None  # pixel (0, 1) is off: stop there
    assert early.spent == 2
    np.testing.assert_array_equal(rle_to_mask(rle, 40, 50, covering=(39, 48)), mask)
    with pytest.raises(RleError, match="outside"):
        rle_to_mask(rle, 40, 50, covering=(40, 0))


@pytest.mark.parametrize("rle, message", [
    ([1, 2], "header"), ([0] * 10, "pixels"), ([300] + [0] * 9, "0-255"), ([[1]] * 8, "0-255"),
    ([10**400] * 8, "0-255"), ([0, 0, 0, 4, 0xF8] + [0] * 5, "8-bit"),  # a 32-bit word size
    (mask_to_rle(np.ones((1, 1), bool))[:-2], "ends before"),
])
def test_malformed_rle_is_refused_with_a_reason(rle, message):
    with pytest.raises(RleError, match=message):
        rle_to_mask(rle, 1, 1)
