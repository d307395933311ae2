"""Per-region sessions: stepping, undo, cache and replay give the same masks (real model, zoom-in on)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from backend_support import grabcut_images

from connectors.memory import buffer_bytes
from connectors.sessions import SessionStore
from interformer.checkpoint import load_model
from interformer.clicks import Click
from interformer.predictor import Predictor

CLICKS = [Click(30, 40, True), Click(10, 80, False), Click(50, 20, True), Click(40, 60, False)]


@pytest.fixture(scope="module")
def predictor_and_feats():
    # small_refine has refine stages, so clicks from the third on use the zoom-in ROI of the
    # previous mask: the path through the session matters, which is what replay must reproduce.
    torch.manual_seed(1)
    predictor = Predictor(load_model(None, variant="small_refine"), device="cpu")
    assert predictor.model.neck.has_refine
    image = grabcut_images(2, size=(64, 96))[1][1]
    return predictor, predictor.encode(image)


def fresh(predictor, feats, clicks, box=None):
    return predictor.session(feats, box=box).replay(clicks).margin


def test_every_path_gives_the_margin_of_a_fresh_replay(predictor_and_feats):
    predictor, feats = predictor_and_feats
    store = SessionStore()
    key = ("img", "id:k1")
    new = lambda: predictor.session(feats)  # noqa: E731
    expected = {n: fresh(predictor, feats, CLICKS[:n]) for n in range(1, len(CLICKS) + 1)}
    paths = []
    for n in range(1, len(CLICKS) + 1):  # click by click: one step each
        out = store.run(key, CLICKS[:n], new)
        paths.append((out.path, out.steps))
        np.testing.assert_array_equal(out.result.margin, expected[n])
    assert paths == [("replay", 1)] + [("step", 1)] * (len(CLICKS) - 1)

    out = store.run(key, CLICKS, new)  # Label Studio repeats the same list
    assert (out.path, out.steps) == ("cached", 0)
    np.testing.assert_array_equal(out.result.margin, expected[4])

    out = store.run(key, CLICKS[:2], new)  # undo twice
    assert (out.path, out.steps) == ("undo", 0)
    np.testing.assert_array_equal(out.result.margin, expected[2])

    out = store.run(key, CLICKS[:2] + [Click(5, 5, False)], new)  # a different third click
    assert out.path == "step"
    np.testing.assert_array_equal(out.result.margin, fresh(predictor, feats, CLICKS[:2] + [Click(5, 5, False)]))

    moved = [Click(31, 40, True)] + CLICKS[1:]  # first click moved: no prefix relation -> replay
    out = store.run(key, moved, new)
    assert (out.path, out.steps) == ("replay", 4)
    np.testing.assert_array_equal(out.result.margin, fresh(predictor, feats, moved))

    out = store.run(key, CLICKS[:2], new)  # e.g. another annotator with the same region id
    assert out.path == "replay"
    np.testing.assert_array_equal(out.result.margin, expected[2])


def test_jumping_several_clicks_ahead_equals_stepping(predictor_and_feats):
    predictor, feats = predictor_and_feats
    store = SessionStore()
    store.run("r", CLICKS[:1], lambda: predictor.session(feats))
    out = store.run("r", CLICKS, lambda: predictor.session(feats))
    assert (out.path, out.steps) == ("step", 3)
    np.testing.assert_array_equal(out.result.margin, fresh(predictor, feats, CLICKS))


def test_a_restarted_store_replays_to_the_same_mask(predictor_and_feats):
    predictor, feats = predictor_and_feats
    first = SessionStore()
    for n in range(1, len(CLICKS)):
        first.run("r", CLICKS[:n], lambda: predictor.session(feats))
    stepped = first.run("r", CLICKS, lambda: predictor.session(feats))
    restarted = SessionStore().run("r", CLICKS, lambda: predictor.session(feats))
    assert restarted.path == "replay"
    np.testing.assert_array_equal(restarted.result.mask, stepped.result.mask)


def test_a_session_made_for_another_box_is_not_reused(predictor_and_feats):
    predictor, feats = predictor_and_feats
    store = SessionStore()
    box_a, box_b = (0, 0, 64, 64), (32, 0, 96, 64)
    store.run("r", CLICKS[:3], lambda: predictor.session(feats, box=box_a), variant=box_a)
    out = store.run("r", CLICKS[:4], lambda: predictor.session(feats, box=box_b), variant=box_b)
    assert out.path == "replay"
    np.testing.assert_array_equal(out.result.margin, fresh(predictor, feats, CLICKS[:4], box=box_b))


def test_the_store_is_bounded_in_bytes_counting_every_click_state(predictor_and_feats):
    predictor, feats = predictor_and_feats
    probe = SessionStore()
    probe.run("one", CLICKS[:1], lambda: predictor.session(feats))
    one_click = probe.nbytes
    probe.run("one", CLICKS, lambda: predictor.session(feats))
    assert probe.nbytes > one_click  # the undo history of every click is counted
    assert one_click >= buffer_bytes(feats)  # the session holds its image's features

    store = SessionStore(max_bytes=int(one_click * 2.5))
    for key in ("a", "b", "c"):
        store.run(key, CLICKS[:1], lambda: predictor.session(feats))
        assert store.nbytes <= store.max_bytes
    assert len(store) == 2 and "a" not in store
    assert store.run("a", CLICKS[:1], lambda: predictor.session(feats)).path == "replay"  # "a" was evicted
    assert store.run("a", CLICKS[:1], lambda: predictor.session(feats)).path == "cached"
    store.drop_image("c")
    assert store.run(("c", 1), CLICKS[:1], lambda: predictor.session(feats)).path == "replay"

    # Growing one region click by click evicts the others, then the region itself once it alone is too big.
    many = [Click(8 + (i * 7) % 48, 8 + (i * 11) % 80, i % 3 != 1) for i in range(120)]
    for n in range(1, len(many) + 1):
        out = store.run("long", many[:n], lambda: predictor.session(feats))
        assert store.nbytes <= store.max_bytes
        if "long" not in store:
            break
    assert n > 1 and "long" not in store and len(store) == 0
    np.testing.assert_array_equal(out.result.margin, fresh(predictor, feats, many[:n]))  # still answered
    assert store.run("long", many[:n], lambda: predictor.session(feats)).path == "replay"


def test_a_failing_click_leaves_no_half_updated_session(predictor_and_feats):
    predictor, feats = predictor_and_feats
    store = SessionStore()
    store.run("r", CLICKS[:2], lambda: predictor.session(feats))
    with pytest.raises(ValueError, match="outside"):
        store.run("r", CLICKS[:2] + [Click(500, 5, True)], lambda: predictor.session(feats))
    out = store.run("r", CLICKS[:3], lambda: predictor.session(feats))
    assert out.path == "replay"
    np.testing.assert_array_equal(out.result.margin, fresh(predictor, feats, CLICKS[:3]))
    with pytest.raises(ValueError, match="at least one click"):
        store.run("r", [], lambda: predictor.session(feats))
