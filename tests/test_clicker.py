"""The simulated annotator: hand-made masks whose right click is known, and properties against scipy's EDT."""
from __future__ import annotations

from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from pipeline.clicker import (
    Click,
    exact_maxima,
    interformer_next_click,
    mark_clicked,
    new_not_clicked,
    padded_distance,
    ritm_error_maps,
    ritm_next_click,
)


def _square(shape, top, left, size, value=1, dtype=np.int8):
    m = np.zeros(shape, dtype=dtype)
    m[top : top + size, left : left + size] = value
    return m


def test_first_click_object_touching_the_border_lands_inside_not_on_the_border():
    # Object = full-height strip of columns 0..9 in a 20 x 30 image. With the 1-pixel pad the border counts
    # as outside, so the distance is min(r + 1, 20 - r, c + 1, 10 - c): maximum 5, first at (4, 4).
    gt = np.zeros((20, 30), np.int8)
    gt[:, :10] = 1
    pred = np.zeros_like(gt, dtype=bool)
    assert ritm_next_click(gt, pred, new_not_clicked(gt.shape)) == Click(4, 4, True)


def test_padded_distance_measures_to_the_image_border():
    m = np.ones((5, 7), bool)
    d = padded_distance(m)
    assert d[0, 0] == 1.0 and d[2, 3] == 3.0 and d.max() == 3.0
    assert d.dtype == np.float32 and d.shape == m.shape


def test_ignore_band_is_in_neither_error_map_and_a_prediction_covering_it_is_perfect():
    gt = _square((30, 30), 10, 10, 10)
    band = _square((30, 30), 8, 8, 14) == 1
    gt[band & (gt == 0)] = -1  # 2-pixel ignore ring around the object
    pred = band.copy()  # covers the object and the whole ignore ring
    fn, fp = ritm_error_maps(gt, pred)
    assert not fn.any() and not fp.any()
    # Perfect: negative click at the first pixel in raster order, as RITM's code does.
    assert ritm_next_click(gt, pred, new_not_clicked(gt.shape)) == Click(0, 0, False)


def test_ignore_band_next_to_a_false_positive_blob():
    gt = _square((40, 40), 5, 5, 10)
    gt[(_square((40, 40), 3, 3, 14) == 1) & (gt == 0)] = -1
    pred = _square((40, 40), 3, 3, 14, dtype=bool)  # object + ignore ring: no error there
    pred[25:32, 25:32] = True  # a 7 x 7 false positive: centre (28, 28), distance 4
    assert ritm_next_click(gt, pred, new_not_clicked(gt.shape)) == Click(28, 28, False)


def test_tie_between_two_objects_takes_the_first_in_raster_order():
    gt = _square((30, 30), 15, 2, 5) | _square((30, 30), 2, 20, 5)  # lower-left and upper-right squares
    click = ritm_next_click(gt, np.zeros(gt.shape, bool), new_not_clicked(gt.shape))
    assert click == Click(4, 22, True)  # the upper square comes first in row-major order


def test_equal_fn_and_fp_maxima_give_a_negative_click():
    gt = _square((30, 30), 2, 2, 5)  # 5 x 5 object, nothing predicted there: fn max 3 at (4, 4)
    pred = _square((30, 30), 20, 20, 5, dtype=bool)  # 5 x 5 false positive: fp max 3 at (22, 22)
    assert ritm_next_click(gt, pred, new_not_clicked(gt.shape)) == Click(22, 22, False)


def test_perfect_prediction_keeps_clicking_the_first_pixel():
    gt = _square((12, 12), 3, 3, 4)
    pred = gt == 1
    not_clicked = new_not_clicked(gt.shape)
    first = ritm_next_click(gt, pred, not_clicked)
    mark_clicked(not_clicked, first)
    assert first == Click(0, 0, False)
    assert ritm_next_click(gt, pred, not_clicked) == Click(0, 0, False)


def test_ritm_zeroes_clicked_pixels_after_the_transform():
    # 5 x 5 missed square: centre distance 3, inner ring 2. Once the centre is clicked (and still missed),
    # RITM's next click is the first inner-ring pixel with distance 2: the clicked pixel is no "hole".
    gt = _square((20, 20), 5, 5, 5)
    pred = np.zeros(gt.shape, bool)
    not_clicked = new_not_clicked(gt.shape)
    first = ritm_next_click(gt, pred, not_clicked)
    assert first == Click(7, 7, True)
    mark_clicked(not_clicked, first)
    assert ritm_next_click(gt, pred, not_clicked) == Click(6, 6, True)


def test_interformer_removes_clicked_pixels_before_the_transform():
    # Same square: with the centre removed first, the inner-ring pixels next to it are at distance 1 and the
    # four diagonal ones at sqrt(2); the click is one of those four.
    gt = _square((20, 20), 5, 5, 5)
    pred = np.zeros(gt.shape, bool)
    rng = np.random.default_rng(0)
    first = interformer_next_click(gt, pred, [], rng)
    assert first == Click(7, 7, True)
    seen = {interformer_next_click(gt, pred, [first], np.random.default_rng(s)) for s in range(40)}
    assert seen == {Click(6, 6, True), Click(6, 8, True), Click(8, 6, True), Click(8, 8, True)}


def test_interformer_random_tie_break_is_seeded_and_covers_all_maxima():
    gt = _square((30, 30), 15, 2, 5) | _square((30, 30), 2, 20, 5)
    pred = np.zeros(gt.shape, bool)
    a = [interformer_next_click(gt, pred, [], np.random.default_rng(s)) for s in range(30)]
    b = [interformer_next_click(gt, pred, [], np.random.default_rng(s)) for s in range(30)]
    assert a == b
    assert set(a) == {Click(17, 4, True), Click(4, 22, True)}


def test_interformer_treats_ignore_as_background_and_stops_when_nothing_is_wrong():
    gt = _square((30, 30), 10, 10, 10)
    gt[(_square((30, 30), 9, 9, 12) == 1) & (gt == 0)] = -1
    pred_ring = _square((30, 30), 9, 9, 12, dtype=bool)
    click = interformer_next_click(gt, pred_ring, [], np.random.default_rng(0))
    assert click is not None and not click.positive and gt[click.row, click.col] == -1
    assert interformer_next_click(gt, gt == 1, [], np.random.default_rng(0)) is None


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        ritm_next_click(np.zeros((4, 4), np.int8), np.zeros((4, 5), bool), new_not_clicked((4, 4)))
    with pytest.raises(ValueError, match="not_clicked"):
        ritm_next_click(np.zeros((4, 4), np.int8), np.zeros((4, 4), bool), new_not_clicked((5, 4)))


masks = arrays(np.int8, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.sampled_from([-1, 0, 1]))


def _edt(mask: np.ndarray) -> np.ndarray:
    """Exact padded distances, independently of the module: float64 roots of integer squared distances."""
    return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


@settings(max_examples=300, deadline=None)
@given(gt=masks, data=st.data())
def test_ritm_click_is_the_first_exact_maximum(gt, data):
    """Spec §1.2 on exact distances, with no tolerance: positive iff the false-negative maximum is strictly
    larger (ties, 0 == 0 included, are negative), at the first pixel in raster order that attains it."""
    pred = data.draw(arrays(bool, gt.shape))
    not_clicked = data.draw(arrays(bool, gt.shape, elements=st.sampled_from([True, True, True, False])))
    obj, valid = gt == 1, gt != -1
    fn_d = _edt(obj & ~pred & valid) * not_clicked
    fp_d = _edt(~obj & pred & valid) * not_clicked
    positive = fn_d.max() > fp_d.max()
    chosen = fn_d if positive else fp_d
    first = np.flatnonzero(chosen.ravel() == chosen.max())[0]
    assert ritm_next_click(gt, pred, not_clicked) == Click(*divmod(int(first), gt.shape[1]), positive)


def _off_by_one_ulp(data) -> callable:
    """A float32 transform like OpenCV's when a buffer's alignment changes its rounding: the true distances,
    each nudged by at most one unit in the last place, up or down, at pixels hypothesis picks (zeros stay exact)."""
    def transform(mask: np.ndarray) -> np.ndarray:
        dist = _edt(np.asarray(mask, bool)).astype(np.float32)
        nudge = data.draw(arrays(np.int8, dist.shape, elements=st.sampled_from([-1, 0, 0, 1])))
        dist = np.where((nudge > 0) & (dist > 0), np.nextafter(dist, np.float32(np.inf)), dist)
        dist = np.where((nudge < 0) & (dist > 0), np.nextafter(dist, np.float32(0)), dist)
        return dist.astype(np.float32)
    return transform


tie_shapes = st.sampled_from([(7, 9), (58, 32), (3, 40), (12, 12), (5, 31)])


@settings(max_examples=80, deadline=None)
@given(gt=masks, shape=tie_shapes, data=st.data())
def test_the_click_does_not_depend_on_float32_rounding(gt, shape, data):
    """Fault injection of the mechanism: OpenCV's float32 transform can return two pixels at one true distance
    one unit in the last place apart, depending on where its buffer sits in memory (the same sample got two
    click sequences in one process). With the transform's values nudged by one ulp anywhere, both rule sets
    still click exactly where the exact distances say."""
    for g in (gt, np.pad(np.ones(shape, np.int8), 1)):
        pred = data.draw(arrays(bool, g.shape, elements=st.sampled_from([False, False, False, True])))
        not_clicked = np.ones(g.shape, bool)
        want_ritm = ritm_next_click(g, pred, not_clicked)
        want_inter = interformer_next_click(g, pred, [], np.random.default_rng(7))
        for by_rounding_up_to in (1024.0, 0.0):  # both ways of making the candidates exact
            with patch("pipeline.clicker.padded_distance", _off_by_one_ulp(data)), \
                    patch("pipeline.clicker._EXACT_BY_ROUNDING", by_rounding_up_to):
                assert ritm_next_click(g, pred, not_clicked) == want_ritm
                assert interformer_next_click(g, pred, [], np.random.default_rng(7)) == want_inter


@settings(max_examples=150, deadline=None)
@given(mask=arrays(bool, st.tuples(st.integers(1, 40), st.integers(1, 40))), data=st.data())
@pytest.mark.parametrize("by_rounding_up_to", [1024.0, 0.0])  # 0: every depth takes the exact-crop path
def test_exact_maxima_are_the_maxima_of_the_exact_transform(mask, data, by_rounding_up_to):
    keep = data.draw(arrays(bool, mask.shape, elements=st.sampled_from([True, True, False])))
    want = _edt(mask) * keep
    with patch("pipeline.clicker._EXACT_BY_ROUNDING", by_rounding_up_to):
        peak, at = exact_maxima(mask, keep)
    assert peak == want.max()
    assert at.tolist() == np.argwhere(want == want.max()).tolist()


@settings(max_examples=100, deadline=None)
@given(gt=masks, data=st.data())
def test_interformer_click_is_a_maximum_of_the_chosen_error_map(gt, data):
    pred = data.draw(arrays(bool, gt.shape))
    obj = gt == 1
    click = interformer_next_click(gt, pred, [], np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))))
    fn_d = ndimage.distance_transform_edt(np.pad(obj & ~pred, 1))[1:-1, 1:-1]
    fp_d = ndimage.distance_transform_edt(np.pad(~obj & pred, 1))[1:-1, 1:-1]
    if fn_d.max() == 0 and fp_d.max() == 0:
        assert click is None
        return
    chosen = fn_d if click.positive else fp_d
    assert chosen[click.row, click.col] == chosen.max()
    assert click.positive == (fn_d.max() > fp_d.max())
    assert click.positive == (obj[click.row, click.col] and not pred[click.row, click.col])
