"""RITM's SPC from the per-sample records: a segmenter with known costs on an injected clock (no sleeps).

RITM (spec §1.6) times its dataset loop with early stopping at IoU 0.90 and divides by the clicks it made,
so a sample reaching 0.90 at click k adds (load + encode + k x click) seconds and k clicks, and one that
never does adds all max_clicks clicks. The loop here always runs max_clicks clicks; the SPC must not depend
on that.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.datasets import Sample, SampleRef
from pipeline.evaluation import EvalConfig, evaluate_sample, pad_to
from pipeline.evaluation_report import summarize_run
from pipeline.metrics import ritm_clicks_made

MAX_CLICKS = 20


class FakeClock:
    """Seconds that pass only when a fake segmenter says it worked."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Result:
    def __init__(self, mask: np.ndarray, canvas: tuple[int, int]) -> None:
        self.mask = mask
        self.padded_mask = pad_to(mask, canvas).astype(bool)


class _CostlySession:
    """Empty prediction before click `reach` (IoU 0), the object itself from it on (IoU 1); None: never."""

    def __init__(self, gt: np.ndarray, clock: FakeClock, click_s: float, reach: int | None) -> None:
        self.gt, self.clock, self.click_s, self.reach = gt, clock, click_s, reach
        self.canvas_size = (gt.shape[0] + 2, gt.shape[1] + 3)
        self.made = 0

    def add_click(self, row: int, col: int, positive: bool) -> _Result:
        self.made += 1
        return self.repredict()

    def repredict(self) -> _Result:
        self.clock.now += self.click_s
        done = self.reach is not None and self.made >= self.reach
        return _Result(self.gt == 1 if done else np.zeros(self.gt.shape, bool), self.canvas_size)


class CostlySegmenter:
    """`start` costs `encode_s` seconds of the clock, each `add_click` or `repredict` costs `click_s`."""

    def __init__(self, clock: FakeClock, encode_s: float, click_s: float, reach: int | None) -> None:
        self.clock, self.encode_s, self.click_s, self.reach = clock, encode_s, click_s, reach

    def start(self, image: np.ndarray, image_id: str | None = None, allow_padding: bool = False) -> _CostlySession:
        self.clock.now += self.encode_s
        gt = _gt()
        return _CostlySession(gt, self.clock, self.click_s, self.reach)


def _gt() -> np.ndarray:
    gt = np.zeros((9, 11), np.int8)
    gt[2:7, 3:9] = 1
    return gt


def _sample(i: int) -> Sample:
    gt = _gt()
    return Sample(SampleRef("D", f"s{i}", f"s{i}.png", "", "binary"), np.zeros((*gt.shape, 3), np.uint8), gt)


seconds = st.integers(0, 4000).map(lambda n: n / 64)  # exact binary fractions: the sums below are exact
samples = st.lists(st.tuples(seconds, seconds, seconds, st.one_of(st.none(), st.integers(1, MAX_CLICKS))),
                   min_size=1, max_size=3)


@settings(max_examples=25, deadline=None)
@given(costs=samples, protocol=st.sampled_from(["ritm", "interformer"]))
def test_spc_is_the_early_stopped_time_over_the_clicks_made(costs, protocol):
    clock = FakeClock()
    results = []
    for i, (load, encode, click, reach) in enumerate(costs):
        seg = CostlySegmenter(clock, encode, click, reach)
        results.append(evaluate_sample(seg, _sample(i), EvalConfig(protocol=protocol, max_clicks=MAX_CLICKS),
                                       load_s=load, clock=clock))
    t = summarize_run("fake", results, MAX_CLICKS)[0].summary.timing
    made = [reach or MAX_CLICKS for *_, reach in costs]
    spent = [load + encode + k * click for (load, encode, click, _), k in zip(costs, made)]
    assert t.spc == pytest.approx(sum(spent) / sum(made), rel=1e-12, abs=1e-12)
    calls = [sum(c is not None for c in r.click_s) for r in results]
    whole = [load + encode + n * click for (load, encode, click, _), n in zip(costs, calls)]
    assert t.run_s_per_click == pytest.approx(sum(whole) / (MAX_CLICKS * len(costs)), rel=1e-12, abs=1e-12)
    if protocol == "ritm":
        model_calls = [c for r in results for c in r.click_s]
        assert t.interact_s_per_click == pytest.approx(sum(model_calls) / len(model_calls), rel=1e-12, abs=1e-12)


def test_one_sample_reaching_090_at_click_k():
    """The brief's example: SPC = (load + encode + k x click) / k, whatever the clicks after k cost."""
    clock = FakeClock()
    res = evaluate_sample(CostlySegmenter(clock, encode_s=0.25, click_s=0.0625, reach=3), _sample(0),
                          EvalConfig(max_clicks=MAX_CLICKS), load_s=0.5, clock=clock)
    assert res.encode_s == 0.25 and res.click_s == [0.0625] * MAX_CLICKS
    assert summarize_run("fake", [res], MAX_CLICKS)[0].summary.timing.spc == (0.5 + 0.25 + 3 * 0.0625) / 3


def test_clicks_made_stop_on_the_float64_iou_as_ritms_loop_does():
    below = float(np.nextafter(0.9, 0.0))
    assert ritm_clicks_made([0.1, 0.9, 0.95]) == 2
    assert ritm_clicks_made([0.1, 0.5]) == 2
    assert ritm_clicks_made([below, 0.91]) == 2  # float32(below) == 0.9: NoC counts click 1, RITM's loop goes on
    assert ritm_clicks_made([0.1, 0.86], stop_iou=0.85) == 2
