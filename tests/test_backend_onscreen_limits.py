"""What on-screen regions in a request can cost (connectors/onscreen.py): bounded whatever the body holds.

The work is counted, not timed: polygon points and outline kept per candidate, candidates per request,
RLE records decoded (the request's `DecodeBudget`) and polygons rasterised.
"""
from __future__ import annotations

import numpy as np
import pytest
from backend_support import LABEL_CONFIG, keypoint
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors import onscreen
from connectors.onscreen import (
    MAX_CANDIDATES,
    MAX_OUTLINE_PER_SIDE,
    MAX_POLYGON_POINTS,
    MAX_RASTERISED,
    START_DECODE_BUDGET,
    StartCandidates,
    onscreen_candidates,
    outline_pixels,
    start_region,
)
from connectors.protocol import ContextItem, Task, parse_label_config, prompt_from_items
from connectors.rle import max_rle_bytes, mask_to_rle
from interformer.clicks import Click
from pipeline.polygons import rasterize

SIZE = (64, 96)
CONFIG = parse_label_config(LABEL_CONFIG)


def prompt(x: float = 50.0, y: float = 50.0, size=SIZE):
    return prompt_from_items([ContextItem.model_validate(keypoint(x, y, size))], CONFIG)


def brush(rle, size=SIZE, rid="b") -> dict:
    return {"id": rid, "type": "brushlabels", "to_name": "image", "original_height": size[0],
            "original_width": size[1], "value": {"format": "rle", "rle": rle, "brushlabels": ["object"]}}


def polygon(points, size=SIZE, rid="p") -> dict:
    return {"id": rid, "type": "polygonlabels", "to_name": "image", "original_height": size[0],
            "original_width": size[1], "value": {"points": points, "polygonlabels": ["object"]}}


@pytest.fixture
def counted(monkeypatch):
    """Counts of the work start_region does: rasterised polygons and every decoding budget it spends."""
    seen = {"rasterised": 0, "budgets": []}

    def counting_rasterize(polygons, size):
        seen["rasterised"] += 1
        return rasterize(polygons, size)

    class CountedBudget(onscreen.DecodeBudget):
        def __init__(self, left: int) -> None:
            super().__init__(left)
            seen["budgets"].append(self)

    monkeypatch.setattr(onscreen, "rasterize", counting_rasterize)
    monkeypatch.setattr(onscreen, "DecodeBudget", CountedBudget)
    return seen


def test_the_auditors_20000_point_polygon_is_no_candidate_and_never_rasterised(counted):
    rng = np.random.default_rng(0)
    zigzag = [[0.0 if i % 2 == 0 else 100.0, float(y)] for i, y in enumerate(rng.random(20_000) * 100)]
    p = prompt(size=(1080, 1920))
    task = Task(id=1, data={}, predictions=[{"id": 1, "result": [polygon(zigzag, (1080, 1920))]}])
    assert onscreen_candidates(task, p) is None
    huge = StartCandidates("prediction:1", (("polygon", np.asarray(zigzag), None),), (1080, 1920))
    assert start_region(huge, p.clicks) is None and counted["rasterised"] == 0


def test_a_polygon_with_an_outline_over_the_cap_is_no_candidate():
    few_points_long_outline = [[0.0 if i % 2 == 0 else 100.0, i * 100 / 80] for i in range(80)]
    assert outline_pixels(np.asarray(few_points_long_outline), SIZE) > MAX_OUTLINE_PER_SIDE * sum(SIZE)
    task = Task(id=1, data={}, predictions=[{"id": 1, "result": [polygon(few_points_long_outline)]}])
    assert onscreen_candidates(task, prompt()) is None


@pytest.mark.parametrize("points", [
    [[10**400, 0], [1, 1], [2, 3]], [[1e308 * 10, 0], [1, 1], [2, 3]], [[1, 2]] * (MAX_POLYGON_POINTS + 1),
    [["1", None], [1, 1], [2, 3]], [[1, 2, 3]] * 3, "abc", {"x": 1},
])
def test_polygon_points_that_are_not_a_small_finite_polygon_are_ignored(points):
    task = Task(id=1, data={}, drafts=[{"id": 1, "result": [polygon(points)]}])
    assert onscreen_candidates(task, prompt()) is None


def test_candidates_per_request_are_capped_and_the_first_covering_one_wins(counted):
    empty, full = mask_to_rle(np.zeros(SIZE, bool)), mask_to_rle(np.ones(SIZE, bool))
    result = [brush(empty, rid=f"e{i}") for i in range(MAX_CANDIDATES - 1)] + [brush(full, rid="last")]
    result += [brush(full, rid=f"over{i}") for i in range(500)]
    cands = onscreen_candidates(Task(id=1, data={}, annotations=[{"id": 1, "result": result}]), prompt())
    assert len(cands.shapes) == MAX_CANDIDATES
    found = start_region(cands, prompt().clicks)
    assert found is not None and found.mask.all()
    assert counted["budgets"][0].spent == MAX_CANDIDATES  # one series record per region, up to the click
    result[MAX_CANDIDATES - 1] = brush(empty, rid="last")  # now only regions over the cap cover the click
    cands = onscreen_candidates(Task(id=1, data={}, annotations=[{"id": 1, "result": result}]), prompt())
    assert start_region(cands, prompt().clicks) is None


def test_an_rle_longer_than_a_valid_stream_is_no_candidate():
    rle = mask_to_rle(np.ones(SIZE, bool))
    longest = max_rle_bytes(SIZE[0] * SIZE[1] * 4)
    ok = Task(id=1, data={}, predictions=[{"id": 1, "result": [brush(rle + [0] * (longest - len(rle)))]}])
    assert len(onscreen_candidates(ok, prompt()).shapes) == 1
    too_long = Task(id=1, data={}, predictions=[{"id": 1, "result": [brush(rle + [0] * 1_000_000)]}])
    assert onscreen_candidates(too_long, prompt()) is None


def test_rle_decoding_of_one_request_stops_at_its_budget(counted, monkeypatch):
    monkeypatch.setattr(onscreen, "START_DECODE_BUDGET", 500)  # the mechanism, at a size that decodes fast
    stripes = np.zeros(SIZE, bool)
    stripes[:, ::2] = True  # 3072 runs: more records than the budget
    rle = np.asarray(mask_to_rle(stripes), dtype=np.uint8)
    cands = StartCandidates("draft:1", tuple(("rle", rle, None) for _ in range(MAX_CANDIDATES)), SIZE)
    assert start_region(cands, (Click(SIZE[0] - 1, SIZE[1] - 2, True),)) is None
    assert len(counted["budgets"]) == 1 and counted["budgets"][0].spent == 500


def test_at_most_a_few_polygons_near_the_click_are_rasterised(counted):
    ring = [[10.0, 10.0], [90.0, 10.0], [90.0, 90.0], [10.0, 90.0], [10.0, 12.0], [88.0, 12.0], [88.0, 88.0],
            [12.0, 88.0], [12.0, 10.0]]  # a thin frame: the click sits just beside its inner edge
    cands = StartCandidates("draft:1", tuple(("polygon", np.asarray(ring), None) for _ in range(MAX_CANDIDATES)), SIZE)
    assert start_region(cands, (Click(32, 48, True),)) is None and counted["rasterised"] == 0  # far from every edge
    near = (Click(int(SIZE[0] * 0.12) + 1, 48, True),)
    assert start_region(cands, near) is None
    assert counted["rasterised"] == MAX_RASTERISED


_number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**500, 10**500),
                    st.integers(-5, 105), st.text(max_size=3), st.none(), st.booleans())
_points = st.one_of(st.lists(st.lists(_number, min_size=0, max_size=3), max_size=40),
                    st.lists(st.tuples(st.floats(0, 100), st.floats(0, 100)).map(list), min_size=3, max_size=60),
                    st.integers(0, 3).map(lambda k: [[0.0 if i % 2 == 0 else 100.0, i * 0.01] for i in range(k * 5000)]))
_rle = st.one_of(st.lists(st.integers(-1, 300), max_size=60), st.just(mask_to_rle(np.ones(SIZE, bool))),
                 st.integers(0, 200_000).map(lambda n: mask_to_rle(np.zeros(SIZE, bool)) + [0] * n),
                 st.lists(_number, max_size=8))
_region = st.one_of(st.builds(brush, _rle, rid=st.text(max_size=3)), st.builds(polygon, _points, rid=st.text(max_size=3)))


@settings(max_examples=120, deadline=None)
@given(st.lists(_region, max_size=MAX_CANDIDATES + 10), st.integers(0, SIZE[0] - 1), st.integers(0, SIZE[1] - 1))
def test_hostile_regions_cost_a_bounded_amount_of_work_and_never_fail(regions, row, col):
    rasterised, budgets = [], []

    def counting_rasterize(polygons, size):
        rasterised.append(1)
        return rasterize(polygons, size)

    class CountedBudget(onscreen.DecodeBudget):
        def __init__(self, left: int) -> None:
            super().__init__(left)
            budgets.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onscreen, "rasterize", counting_rasterize)
        mp.setattr(onscreen, "DecodeBudget", CountedBudget)
        cands = onscreen_candidates(Task(id=1, data={}, annotations=[{"id": 1, "result": regions}]), prompt())
        found = start_region(cands, (Click(row, col, True),))
    if cands is not None:
        assert len(cands.shapes) <= MAX_CANDIDATES
        for kind, data, _ in cands.shapes:
            if kind == "polygon":
                assert 3 <= len(data) <= MAX_POLYGON_POINTS and np.isfinite(data).all()
                assert outline_pixels(data, SIZE) <= MAX_OUTLINE_PER_SIDE * sum(SIZE)
            else:
                assert data.dtype == np.uint8 and len(data) <= max_rle_bytes(SIZE[0] * SIZE[1] * 4)
    assert len(rasterised) <= MAX_RASTERISED and all(b.spent <= START_DECODE_BUDGET for b in budgets)
    assert found is None or (found.mask.shape == SIZE and found.mask[row, col])


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 30), st.integers(2, 30),
       st.lists(st.tuples(st.floats(-20, 120), st.floats(-20, 120)), min_size=3, max_size=12), st.booleans())
def test_the_click_test_never_skips_a_polygon_that_covers_the_click(h, w, raw, snap):
    """A polygon is rasterised only when the click is inside or near it; this must never skip one whose mask
    covers the click, self-intersecting ones included."""
    points = np.clip(np.asarray(raw), 0.0, 100.0)
    if snap:  # vertices on pixel corners, where edge rules matter most
        points = np.round(points * [w / 100.0, h / 100.0]) / [w / 100.0, h / 100.0]
    mask = rasterize([(points * [w / 100.0, h / 100.0]).reshape(-1).tolist()], (h, w))
    for row, col in zip(*np.nonzero(mask)):
        assert onscreen._polygon_near(points, (h, w), int(row), int(col))
