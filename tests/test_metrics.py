"""IoU with ignore, NoC, both NoF definitions, mIoU@k and timing aggregation."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.metrics import (
    iou,
    mean_noc,
    miou_at,
    miou_curve,
    nof_ritm,
    noc,
    paired_difference_interval,
    success_ratio,
    summarize,
    timing,
)


def test_iou_excludes_the_ignore_label_from_intersection_and_union():
    gt = np.array([[1, 1, -1, 0], [1, 1, -1, 0]], np.int8)
    pred = np.array([[1, 0, 1, 1], [1, 1, 1, 0]], bool)
    # valid object pixels 4, predicted 3 of them; one false positive at (0, 3); ignore column not counted.
    assert iou(gt, pred) == pytest.approx(3 / 5)


def test_iou_of_empty_object_and_empty_prediction_is_one():
    assert iou(np.zeros((3, 3), np.int8), np.zeros((3, 3), bool)) == 1.0


def test_noc_first_click_reaching_the_threshold_or_the_cap():
    ious = [0.5, 0.86, 0.91]
    assert noc(ious, 0.85) == 2
    assert noc(ious, 0.90) == 3
    assert noc(ious, 0.95) == 20
    assert noc([0.1] * 19 + [0.95], 0.9) == 20  # reached only at click 20: counted as 20 like a failure


def test_noc_compares_in_float32_like_ritm():
    # 0.8499999999 is below 0.85 in float64 but rounds to float32(0.85): RITM counts it as reached.
    assert noc([0.8499999999], 0.85) == 1
    assert noc([0.8499], 0.85) == 20


def test_nof_ritm_and_success_ratio_differ_on_a_threshold_reached_at_the_last_click():
    runs = [
        [0.95] * 20,  # NoC 1
        [0.1] * 19 + [0.95],  # first reaches 0.9 at click 20
        [0.1] * 20,  # never
    ]
    assert nof_ritm(runs, 0.90) == 2
    assert success_ratio(runs, 0.90) == pytest.approx(2 / 3)
    assert mean_noc(runs, 0.90) == pytest.approx((1 + 20 + 20) / 3)


def test_miou_at_k_and_the_curve():
    runs = [[0.2, 0.4, 0.6], [0.4, 0.6, 1.0]]
    assert miou_at(runs, 1) == pytest.approx(0.3)
    assert miou_curve(runs, 3) == pytest.approx([0.3, 0.5, 0.8])
    with pytest.raises(ValueError, match="fewer than 4"):
        miou_at(runs, 4)
    with pytest.raises(ValueError, match="1-based"):
        miou_at(runs, 0)
    with pytest.raises(ValueError, match="no samples"):
        miou_at([], 1)


def test_timing_splits_encode_and_click_time():
    t = timing(encode_s=[1.0, 3.0], click_s=[[0.1, 0.3], [0.2]], total_s=[2.0, 4.0], load_s=[0.5, 0.5],
               ious=[[0.5, 0.95], [0.95]])
    assert t.encode_s_per_image == pytest.approx(2.0)
    assert t.interact_s_per_click == pytest.approx(0.2)
    assert t.run_s_per_click == pytest.approx(2.0)
    # RITM's SPC: sample 1 stops at click 2, sample 2 at click 1 -> (0.5 + 1 + 0.4 + 0.5 + 3 + 0.2) / 3
    assert t.spc == pytest.approx(5.6 / 3)
    # None marks a click with no model call (InterFormer protocol with nothing left to correct)
    t = timing([1.0], [[0.1, None, 0.3]], [1.0], [0.0], [[0.1, 0.2, 0.3]])
    assert t.interact_s_per_click == pytest.approx(0.2) and t.spc == pytest.approx(1.4 / 3)
    with pytest.raises(ValueError, match="same number of samples"):
        timing([1.0], [[0.1]], [1.0], [0.0], [])


def test_summary_of_a_run():
    runs = [[0.5, 0.86, 0.91] + [0.95] * 17, [0.95] * 20]
    s = summarize(runs)
    assert s.samples == 2 and s.noc85 == pytest.approx(1.5) and s.noc90 == pytest.approx(2.0)
    assert s.nof85 == 0 and s.success90 == 1.0 and len(s.miou) == 20
    assert s.to_dict()["miou"][0] == pytest.approx(0.725)


masks = arrays(np.int8, st.tuples(st.integers(1, 16), st.integers(1, 16)), elements=st.sampled_from([-1, 0, 1]))


@settings(max_examples=200, deadline=None)
@given(gt=masks, data=st.data())
def test_iou_is_symmetric_once_the_ignore_region_goes_with_it_and_in_unit_interval(gt, data):
    """IoU of two 0/1 masks is symmetric; with ignore pixels in gt it is symmetric only if the swapped pair
    keeps the same ignore region (the other mask as gt, -1 there), and it equals the IoU of the remaining
    pixels alone. (Swapping without the ignore region is false: gt [[1, -1]], pred [[1, 1]] gives 1.0 vs 0.5.)"""
    pred = data.draw(arrays(bool, gt.shape))
    valid = gt != -1
    a = iou(gt, pred)
    assert 0.0 <= a <= 1.0
    as_gt = np.where(valid, pred, -1).astype(np.int8)
    assert a == iou(as_gt, gt == 1)
    if valid.all():
        assert a == iou(pred.astype(np.int8), gt == 1)
    if valid.any():
        assert a == iou(gt[valid][None, :], pred[valid][None, :])
    assert iou(gt, gt == 1) == 1.0


@settings(max_examples=200, deadline=None)
@given(
    ious=st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=30),
    thr=st.floats(0.0, 1.0, allow_nan=False),
)
def test_noc_is_between_one_and_twenty(ious, thr):
    n = noc(ious, thr)
    assert 1 <= n <= 20
    if n < 20:
        assert np.float32(ious[n - 1]) >= np.float32(thr)


paired = st.integers(1, 60).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 20), min_size=n, max_size=n), st.lists(st.integers(1, 20), min_size=n, max_size=n)))


@settings(max_examples=60, deadline=None)
@given(pair=paired, shift=st.integers(-5, 5))
def test_paired_difference_interval_is_a_bootstrap_of_the_mean_difference(pair, shift):
    """The interval of mean(candidate - baseline): within the per-sample differences' range, around the observed
    mean, moved exactly by a shift of the candidate, mirrored when the two swap, (0, 0) for identical runs."""
    base, cand = pair
    diff = np.subtract(cand, base, dtype=np.float64)
    low, high = paired_difference_interval(base, cand, resamples=2000)
    assert diff.min() - 1e-9 <= low <= high <= diff.max() + 1e-9
    if diff.size >= 5 and np.ptp(diff) > 0:
        assert low <= diff.mean() <= high
    shifted = paired_difference_interval(base, [c + shift for c in cand], resamples=2000)
    assert shifted == pytest.approx((low + shift, high + shift), abs=1e-9)
    swapped = paired_difference_interval(cand, base, resamples=2000)
    assert swapped == pytest.approx((-high, -low), abs=1e-9)
    assert paired_difference_interval(base, base) == (0.0, 0.0)


def test_paired_difference_interval_narrows_with_samples_and_refuses_bad_input():
    rng = np.random.default_rng(0)
    base = rng.integers(1, 21, 400)
    cand = base + rng.integers(-2, 3, 400)
    few = paired_difference_interval(base[:25], cand[:25])
    many = paired_difference_interval(base, cand)
    assert many[1] - many[0] < few[1] - few[0]
    for bad in (([1, 2], [1]), ([], []), ([[1, 2]], [[1, 2]])):
        with pytest.raises(ValueError):
            paired_difference_interval(*bad)
    with pytest.raises(ValueError):
        paired_difference_interval([1], [2], level=1.0)
