"""Sessions that start from an existing mask or a given reference-label map (issue 12, item 1)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from connectors.sessions import SessionStore
from interformer import InvalidMaskError, Predictor, PreprocessConfig, SessionStart
from interformer.clicks import (DEF_FG, MAYBE_BG, MAYBE_FG, Click, add_click_disk, initial_ref_label,
                                update_by_prediction, zoom_in_roi)
from interformer.config import SMALL_REFINE
from interformer.modeling import InterFormer
from interformer.predictor import mask_to_canvas

CLICKS = [Click(30, 40, True), Click(12, 70, False), Click(55, 20, True), Click(40, 45, False)]


@pytest.fixture(scope="module")
def predictor(small_model):
    return Predictor(small_model, device="cpu")


@pytest.fixture(scope="module")
def feats(predictor):
    return predictor.encode(np.random.default_rng(3).integers(0, 256, size=(70, 90, 3), dtype=np.uint8))


def _blob(shape, top, left, bottom, right) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[top:bottom, left:right] = True
    return m


def _assert_same_steps(a, b, clicks):
    for c in clicks:
        ra, rb = a.add_click(*c), b.add_click(*c)
        np.testing.assert_array_equal(ra.margin, rb.margin)
        np.testing.assert_array_equal(a.ref_label, b.ref_label)


def test_initial_mask_equals_prediction_update_click_for_click(predictor, feats):
    mask = _blob((70, 90), 20, 25, 50, 60)
    from_mask = predictor.session(feats, initial_mask=mask)
    canvas = mask_to_canvas(mask, feats.geometry)
    ref = update_by_prediction(initial_ref_label(feats.geometry.padded_size), canvas)
    manual = predictor.session(feats, start=SessionStart.from_ref_label(ref, feats.geometry, prev_pred=canvas))
    # before any click: maybe-fg exactly inside the mask, maybe-bg outside (padding included)
    assert np.array_equal(from_mask.ref_label == MAYBE_FG, canvas)
    assert np.array_equal(from_mask.ref_label == MAYBE_BG, ~canvas)
    _assert_same_steps(from_mask, manual, CLICKS)
    # the prior changes the answer: a blank session's first click differs
    first = predictor.session(feats, initial_mask=mask).add_click(*CLICKS[0]).margin
    assert not np.array_equal(predictor.session(feats).add_click(*CLICKS[0]).margin, first)


def test_undo_to_start_returns_the_initial_mask_and_replay_keeps_it(predictor, feats):
    mask = _blob((70, 90), 5, 10, 40, 33)
    s = predictor.session(feats, initial_mask=mask)
    assert s.result is not None and s.result.clicks == () and np.array_equal(s.result.mask, mask)
    start_ref = s.ref_label.copy()
    stepped = [s.add_click(*c).margin for c in CLICKS]
    for _ in CLICKS[:-1]:
        s.undo()
    last = s.undo()
    assert np.array_equal(last.mask, mask) and np.array_equal(s.ref_label, start_ref)
    assert s.undo() is last and s.clicks == []
    replayed = s.replay(CLICKS[:2])
    np.testing.assert_array_equal(replayed.margin, stepped[1])
    s.reset()
    assert np.array_equal(s.result.mask, mask) and np.array_equal(s.ref_label, start_ref)


def test_blank_session_still_undoes_to_none(predictor, feats):
    s = predictor.session(feats)
    s.add_click(30, 40)
    assert s.undo() is None and s.result is None


def test_resized_image_initial_mask_maps_to_canvas_and_back(small_model):
    pred = Predictor(small_model, PreprocessConfig(max_side=64), device="cpu")
    feats = pred.encode(np.random.default_rng(5).integers(0, 256, size=(100, 160, 3), dtype=np.uint8))
    mask = _blob((100, 160), 10, 20, 70, 100)
    s = pred.session(feats, initial_mask=mask)
    canvas = mask_to_canvas(mask, feats.geometry)
    assert canvas.shape == feats.geometry.padded_size and canvas[:40, :64].mean() == pytest.approx(mask.mean(), abs=0.03)
    assert not canvas[40:].any()
    assert np.array_equal(s.result.mask, mask)
    assert s.add_click(50, 60).mask.shape == (100, 160)


def test_zoom_in_sees_the_initial_mask_as_previous_prediction():
    torch.manual_seed(0)
    cfg = replace(SMALL_REFINE, zoom_in=replace(SMALL_REFINE.zoom_in, start_click=1))
    pred = Predictor(InterFormer(cfg).eval(), device="cpu")
    feats = pred.encode(np.random.default_rng(1).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    mask = _blob((100, 120), 10, 10, 30, 40)
    s = pred.session(feats, initial_mask=mask)
    got = s.add_click(80, 100, True)
    canvas = mask_to_canvas(mask, feats.geometry)
    ref = add_click_disk(s.start.ref_label, 80, 100, True, cfg.clicks.inner_radius)
    zc = cfg.zoom_in
    roi = zoom_in_roi(canvas, ref, zc.expand_ratio, zc.min_size, zc.max_stride)
    assert roi != zoom_in_roi(np.zeros_like(canvas), ref, zc.expand_ratio, zc.min_size, zc.max_stride)
    np.testing.assert_array_equal(got.margin, pred.predict_margin(feats, ref, roi))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((70, 90), dtype=np.uint8), "bool"),
    (np.zeros((70, 90), dtype=np.float32), "bool"),
    (np.zeros((90, 70), dtype=bool), "shape"),
    (np.zeros((70, 90, 1), dtype=bool), "shape"),
    ([[True]], "bool"),
])
def test_bad_initial_masks_raise_clear_errors(predictor, feats, bad, message):
    with pytest.raises(InvalidMaskError, match=message):
        predictor.session(feats, initial_mask=bad)


@pytest.mark.parametrize("bad, message", [
    (np.full((96, 96), 5, dtype=np.uint8), "0..4"),
    (np.full((96, 96), -1, dtype=np.int64), "0..4"),
    (np.full((70, 90), 2, dtype=np.uint8), "shape"),
    (np.full((96, 96), 2.0), "integer"),
])
def test_bad_reference_label_maps_raise_clear_errors(feats, bad, message):
    with pytest.raises(InvalidMaskError, match=message):
        SessionStart.from_ref_label(bad, feats.geometry)


def test_given_reference_label_map_is_used_as_is(predictor, feats):
    ref = initial_ref_label(feats.geometry.padded_size)
    ref[:30, :30] = DEF_FG
    s = predictor.session(feats, start=SessionStart.from_ref_label(ref.astype(np.int64), feats.geometry))
    assert s.ref_label.dtype == np.uint8 and np.array_equal(s.ref_label, ref) and s.result is None
    expected = predictor.predict_margin(feats, add_click_disk(ref, 50, 50, True), None)
    np.testing.assert_array_equal(s.add_click(50, 50).margin, expected)
    with pytest.raises(ValueError, match="at most one"):
        predictor.session(feats, initial_mask=np.zeros((70, 90), bool), start=SessionStart.blank(feats.geometry))
    with pytest.raises(ValueError, match="at most one"):
        predictor.session(feats, initial_mask=np.zeros((70, 90), bool), initial_clicks=CLICKS[:1])


def test_session_store_keeps_the_initial_mask_on_every_path(predictor, feats):
    mask = _blob((70, 90), 20, 25, 50, 60)
    reference = predictor.session(feats, initial_mask=mask)
    expected = [reference.add_click(*c).margin for c in CLICKS]
    store = SessionStore()
    new = lambda: predictor.session(feats, initial_mask=mask)  # noqa: E731
    paths = []
    for n in (1, 2, 4, 3, 4):  # replay, step, step, undo, step
        out = store.run(("img", "r"), CLICKS[:n], new, variant="m")
        paths.append(out.path)
        np.testing.assert_array_equal(out.result.margin, expected[n - 1])
    store.drop(("img", "r"))  # e.g. a restarted actor: rebuilt from the clicks
    np.testing.assert_array_equal(store.run(("img", "r"), CLICKS[:3], new, variant="m").result.margin, expected[2])
    assert paths == ["replay", "step", "step", "undo", "step"]


PREFIX = [Click(35, 45, True), Click(8, 8, False), Click(60, 80, False)]


@pytest.mark.parametrize("zoom_from", [1, 2, 3, 5])
def test_initial_clicks_answer_as_if_the_clicks_were_added_after_them(zoom_from):
    """A session started after a pre-annotation's clicks equals, click for click, one session that made those
    clicks and goes on; the zoom-in counts the prefix (start_click falls before, inside and after it)."""
    torch.manual_seed(0)
    cfg = replace(SMALL_REFINE, zoom_in=replace(SMALL_REFINE.zoom_in, start_click=zoom_from))
    pred = Predictor(InterFormer(cfg).eval(), device="cpu")
    feats = pred.encode(np.random.default_rng(5).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    whole = pred.session(feats)
    before = whole.replay(PREFIX)
    started = pred.session(feats, initial_clicks=PREFIX)
    assert started.clicks == [] and started.start.clicks == tuple(PREFIX)
    np.testing.assert_array_equal(started.result.margin, before.margin)
    np.testing.assert_array_equal(started.ref_label, whole.ref_label)
    _assert_same_steps(started, whole, CLICKS)
    # undo past every later click shows the prefix's mask and never removes a prefix click
    for _ in range(len(CLICKS) + 2):
        last = started.undo()
    np.testing.assert_array_equal(last.mask, before.mask)
    assert started.clicks == [] and np.array_equal(started.ref_label, started.start.ref_label)
    # replay (an actor rebuilding the region) keeps the prefix
    again = started.replay(CLICKS[:2])
    np.testing.assert_array_equal(again.margin, pred.session(feats).replay(PREFIX + CLICKS[:2]).margin)


def test_snapshot_of_a_session_continues_it_exactly(predictor, feats):
    s = predictor.session(feats, initial_mask=_blob((70, 90), 20, 25, 50, 60))
    s.replay(CLICKS[:2])
    resumed = predictor.session(feats, start=s.snapshot())
    _assert_same_steps(resumed, s, CLICKS[2:])
    blank = predictor.session(feats).snapshot()
    assert blank.mask is None and blank.result is None and blank.clicks == ()


def test_empty_initial_clicks_is_a_blank_start_and_bad_ones_raise(predictor, feats):
    s = predictor.session(feats, initial_clicks=[])
    assert s.result is None
    np.testing.assert_array_equal(s.add_click(*CLICKS[0]).margin, predictor.session(feats).add_click(*CLICKS[0]).margin)
    with pytest.raises(ValueError, match="outside"):
        predictor.session(feats, initial_clicks=[Click(70, 10, True)])
