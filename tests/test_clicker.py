"""The simulated annotator: hand-made masks whose right click is known, and properties against scipy's EDT."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from pipeline.clicker import (
    Click,
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


@settings(max_examples=150, deadline=None)
@given(gt=masks, data=st.data())
def test_ritm_click_matches_an_independent_scipy_computation(gt, data):
    pred = data.draw(arrays(bool, gt.shape))
    not_clicked = data.draw(arrays(bool, gt.shape, elements=st.sampled_from([True, True, True, False])))
    obj, valid = gt == 1, gt != -1
    fn, fp = obj & ~pred & valid, ~obj & pred & valid
    fn_d = ndimage.distance_transform_edt(np.pad(fn, 1))[1:-1, 1:-1] * not_clicked
    fp_d = ndimage.distance_transform_edt(np.pad(fp, 1))[1:-1, 1:-1] * not_clicked
    positive = fn_d.max() > fp_d.max() + 1e-4
    tie = abs(fn_d.max() - fp_d.max()) <= 1e-4
    click = ritm_next_click(gt, pred, not_clicked)
    if not tie:
        assert click.positive == positive
    chosen = fn_d if click.positive else fp_d
    assert chosen[click.row, click.col] == pytest.approx(chosen.max(), abs=1e-4)
    # First maximum in raster order (distances of exact EDT differ by far more than float32 rounding).
    first = np.flatnonzero(chosen.ravel() >= chosen.max() - 1e-4)[0]
    assert (click.row, click.col) == divmod(int(first), gt.shape[1])


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
    assert chosen[click.row, click.col] == pytest.approx(chosen.max(), abs=1e-4)
    assert click.positive == (obj[click.row, click.col] and not pred[click.row, click.col])
