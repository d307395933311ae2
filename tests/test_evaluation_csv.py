"""results.csv carries the per-sample numbers exactly: NoC recomputed from it is the summary's.

The IoUs that matter are the ones a rounding step away from a threshold, so the generator draws, besides any
IoU, each threshold and its neighbours one float64 and one float32 step below and above.
"""
from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.evaluation import SampleResult
from pipeline.evaluation_report import write_csv
from pipeline.metrics import noc

THRESHOLDS = (0.80, 0.85, 0.90)


def _neighbours(t: float) -> list[float]:
    f32 = np.float32(t)
    return [t, float(np.nextafter(t, 0.0)), float(np.nextafter(t, 1.0)), float(f32),
            float(np.nextafter(f32, np.float32(0))), float(np.nextafter(f32, np.float32(1)))]


NEAR = [v for t in THRESHOLDS for v in _neighbours(t)]
ious = st.one_of(st.sampled_from(NEAR), st.floats(0.0, 1.0))
runs = st.lists(st.lists(ious, min_size=20, max_size=20), min_size=1, max_size=3)


def _result(i: int, values: list[float]) -> SampleResult:
    return SampleResult("D", f"s{i}", f"s{i}.png", "ritm", 4, 4, values, [[0, 0, True]] * len(values), 0.0, 0.0,
                        [1e-7 * (k + 1) for k in range(len(values))], 0.0)


@settings(max_examples=100, deadline=None)
@given(values=runs)
def test_noc_from_results_csv_equals_noc_of_the_results(values):
    results = [_result(i, v) for i, v in enumerate(values)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "results.csv"
        write_csv(results, path)
        rows = list(csv.DictReader(path.open(newline="")))
    for r in results:
        mine = [row for row in rows if row["sample_id"] == r.sample_id]
        read = [float(row["iou"]) for row in mine]
        assert read == r.ious
        assert [float(row["click_s"]) for row in mine] == r.click_s
        for t in THRESHOLDS:
            assert noc(read, t) == noc(r.ious, t)
