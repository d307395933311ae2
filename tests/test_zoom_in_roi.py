"""The zoom-in ROI of Tiny's refine stages, checked against hand-worked cases of the spec's rules.

../shared/spec/interformer.md §4.4 (ClickSegmentorZoomIn.get_roi): mask = previous prediction ∪ definite
clicks (ref 4 or 0); bbox (left, up, right+1, bottom+1), the whole map when the mask is empty; expanded
about its centre by `expand_ratio` (rounded, clipped to the map); at least `min_size` per side around the
centre (clipped); snapped outward to multiples of `max_stride`. Every expected ROI below is worked out by
hand from those rules (the arithmetic is in the comments), so a function that returns the whole map, skips
a rule or snaps the wrong way fails.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interformer.clicks import DEF_BG, DEF_FG, MAYBE_BG, MAYBE_FG, add_click_disk, initial_ref_label, zoom_in_roi

RATIO, MIN_SIZE, STRIDE = 1.4, 32, 32  # the demo's defaults (interformer/config.py)


def pred_box(shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """A previous prediction: rows[0]..rows[1] x cols[0]..cols[1], ends included."""
    pred = np.zeros(shape, bool)
    pred[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    return pred


def test_a_rectangle_is_expanded_about_its_centre_then_snapped_outward():
    # bbox left 60, right 110, up 100, bottom 140; centre (x 85, y 120); half sizes 25 x 20.
    # expanded: x 85 -/+ 1.4*25 = 50 .. 120, y 120 -/+ 1.4*20 = 92 .. 148 (min 32 adds nothing)
    # snapped: floor(50/32)*32 = 32, floor(92/32)*32 = 64, ceil(120/32)*32 = 128, ceil(148/32)*32 = 160
    pred = pred_box((256, 256), (100, 139), (60, 109))
    assert zoom_in_roi(pred, initial_ref_label((256, 256)), RATIO, MIN_SIZE, STRIDE) == (32, 64, 128, 160)
    # stride 16: floor(50/16)*16 = 48, floor(92/16)*16 = 80, ceil(120/16)*16 = 128, ceil(148/16)*16 = 160
    assert zoom_in_roi(pred, initial_ref_label((256, 256)), RATIO, MIN_SIZE, 16) == (48, 80, 128, 160)
    # no expansion (ratio 1) and stride 1: the bbox itself, exclusive ends
    assert zoom_in_roi(pred, initial_ref_label((256, 256)), 1.0, 0, 1) == (60, 100, 110, 140)
    # ratio 2: x 85 -/+ 50 = 35 .. 135, y 120 -/+ 40 = 80 .. 160 -> 32, 64, 160, 160
    assert zoom_in_roi(pred, initial_ref_label((256, 256)), 2.0, MIN_SIZE, STRIDE) == (32, 64, 160, 160)


def test_an_empty_prediction_without_clicks_gives_the_whole_map():
    for shape in [(128, 192), (64, 96), (32, 32)]:
        h, w = shape
        assert zoom_in_roi(np.zeros(shape, bool), initial_ref_label(shape), RATIO, MIN_SIZE, STRIDE) == (0, 0, w, h)


def test_a_single_pixel_grows_to_the_minimum_size():
    # pixel (row 100, col 200): bbox 200..201 x 100..101, centre (200.5, 100.5)
    # expanded by 1.4: 200.5 -/+ 0.7 -> 200 .. 201 (rounded), 100 .. 101
    # min size 32: 200.5 -/+ 16 = 184.5 .. 216.5 -> 184 .. 216; 84.5 .. 116.5 -> 84 .. 116 (half to even;
    # half up gives the same after snapping) -> snapped: 160, 64, 224, 128
    pred = pred_box((256, 256), (100, 100), (200, 200))
    assert zoom_in_roi(pred, initial_ref_label((256, 256)), RATIO, MIN_SIZE, STRIDE) == (160, 64, 224, 128)
    # without a minimum size the pixel's own bbox, snapped: floor(200/32)*32 = 192 .. 224, 96 .. 128
    assert zoom_in_roi(pred, initial_ref_label((256, 256)), RATIO, 0, STRIDE) == (192, 96, 224, 128)
    # a minimum size larger than the map is clipped to it
    assert zoom_in_roi(pred, initial_ref_label((256, 256)), RATIO, 1024, STRIDE) == (0, 0, 256, 256)


def test_a_prediction_touching_the_border_is_clipped_to_the_map():
    # top-right corner: rows 0..19, cols 236..255 -> bbox 236..256 x 0..20, centre (246, 10), half 10 x 10
    # expanded: 246 -/+ 14 = 232 .. 260 -> clipped 256; 10 -/+ 14 = -4 -> 0 .. 24
    # min size: 246 - 16 = 230 (< 232, wins); 10 + 16 = 26 (> 24, wins) -> 230, 0, 256, 26
    # snapped: floor(230/32)*32 = 224, 0, 256, ceil(26/32)*32 = 32
    pred = pred_box((256, 256), (0, 19), (236, 255))
    assert zoom_in_roi(pred, initial_ref_label((256, 256)), RATIO, MIN_SIZE, STRIDE) == (224, 0, 256, 32)
    # bottom-left pixel of a 64 x 96 map: centre (0.5, 63.5); min box -15.5 .. 16.5 -> 0 .. 16, 47.5 .. 79.5
    # -> 48 (half to even) .. 64 (clipped) -> snapped 0, 32, 32, 64
    pred = pred_box((64, 96), (63, 63), (0, 0))
    assert zoom_in_roi(pred, initial_ref_label((64, 96)), RATIO, MIN_SIZE, STRIDE) == (0, 32, 32, 64)


def test_definite_clicks_count_and_maybe_labels_do_not():
    shape = (512, 512)
    pred = pred_box(shape, (100, 119), (100, 119))
    ref = add_click_disk(initial_ref_label(shape), 300, 300, positive=False)  # disk rows/cols 295..305
    # bbox 100..306 on both axes, centre 203, half 103: 203 -/+ 144.2 = 58.8 .. 347.2 -> 59 .. 347
    # snapped: floor(59/32)*32 = 32 .. ceil(347/32)*32 = 352
    assert zoom_in_roi(pred, ref, RATIO, MIN_SIZE, STRIDE) == (32, 32, 352, 352)
    assert (ref == DEF_BG).sum() > 0
    # "maybe" labels left by earlier predictions do not enter the mask
    ref_maybe = initial_ref_label(shape)
    ref_maybe[400:500, 400:500] = MAYBE_FG
    ref_maybe[0:50, 450:500] = MAYBE_BG
    alone = zoom_in_roi(pred, initial_ref_label(shape), RATIO, MIN_SIZE, STRIDE)
    assert zoom_in_roi(pred, ref_maybe, RATIO, MIN_SIZE, STRIDE) == alone
    # a positive click alone (empty prediction): disk 95..105 -> bbox 95..106, centre 100.5, half 5.5
    # expanded 100.5 -/+ 7.7 -> 93 .. 108; min size 84.5 .. 116.5 -> 84 .. 116; snapped 64 .. 128
    ref_pos = add_click_disk(initial_ref_label((256, 256)), 100, 100, positive=True)
    assert (ref_pos == DEF_FG).sum() > 0
    assert zoom_in_roi(np.zeros((256, 256), bool), ref_pos, RATIO, MIN_SIZE, STRIDE) == (64, 64, 128, 128)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_roi_covers_the_mask_is_aligned_and_no_larger_than_the_rules_allow(data):
    h = 32 * data.draw(st.integers(1, 12), label="h/32")
    w = 32 * data.draw(st.integers(1, 12), label="w/32")
    top = data.draw(st.integers(0, h - 1), label="top")
    left = data.draw(st.integers(0, w - 1), label="left")
    bottom = data.draw(st.integers(top, h - 1), label="bottom")
    right = data.draw(st.integers(left, w - 1), label="right")
    ratio = data.draw(st.sampled_from([1.0, 1.4, 2.0]), label="ratio")
    min_size = data.draw(st.sampled_from([0, 32, 64]), label="min_size")
    stride = data.draw(st.sampled_from([1, 8, 32]), label="stride")
    pred = pred_box((h, w), (top, bottom), (left, right))
    x0, y0, x1, y1 = zoom_in_roi(pred, initial_ref_label((h, w)), ratio, min_size, stride)
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert x0 % stride == 0 and y0 % stride == 0 and (x1 % stride == 0 or x1 == w) and (y1 % stride == 0 or y1 == h)
    assert x0 <= left and right < x1 and y0 <= top and bottom < y1  # the previous prediction is inside
    # no wider than the expanded (or minimum-size) box, plus rounding and one stride of snapping per side
    bw, bh = right + 1 - left, bottom + 1 - top
    assert x1 - x0 <= max(ratio * bw, min_size) + 2 + 2 * (stride - 1)
    assert y1 - y0 <= max(ratio * bh, min_size) + 2 + 2 * (stride - 1)


@pytest.mark.parametrize("shape", [(64, 96), (96, 64)])
def test_a_full_map_prediction_gives_the_whole_map(shape):
    h, w = shape
    assert zoom_in_roi(np.ones(shape, bool), initial_ref_label(shape), RATIO, MIN_SIZE, STRIDE) == (0, 0, w, h)
