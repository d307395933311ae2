"""Brush RLE: our numpy encoder against label-studio-sdk's own encoder (byte for byte) and decoder."""
from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter import brush

from connectors.rle import mask_to_rle, rle_to_mask


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
