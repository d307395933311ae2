"""The evaluation loop (both protocols), result files, the GrabCut baseline, and jobs/evaluate.py end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.baselines import GrabCutBaseline
from pipeline.clicker import Click
from pipeline.datasets import Sample, SampleRef, resolve
from pipeline.evaluation import (
    EvalConfig,
    SampleResult,
    append_results,
    evaluate_ref,
    evaluate_sample,
    pad_to,
    read_results,
)
from pipeline.segmenters import SegmenterSpec

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


class _Result:
    def __init__(self, mask: np.ndarray, canvas: tuple[int, int], prob: np.ndarray | None = None) -> None:
        self.mask = mask
        self.padded_mask = pad_to(mask, canvas).astype(bool)
        if prob is not None:
            self.prob = prob


class _DiskSession:
    """A transparent segmenter for loop tests: the mask is the union of radius-r disks at positive clicks,
    minus disks at negative clicks."""

    def __init__(self, shape: tuple[int, int], radius: int, with_prob: bool) -> None:
        self.shape = shape
        self.canvas_size = (shape[0] + 3, shape[1] + 5)
        self.radius = radius
        self.with_prob = with_prob
        self.clicks: list[Click] = []

    def add_click(self, row: int, col: int, positive: bool) -> _Result:
        self.clicks.append(Click(row, col, positive))
        return self.repredict()

    def repredict(self) -> _Result:
        yy, xx = np.mgrid[: self.shape[0], : self.shape[1]]
        mask = np.zeros(self.shape, bool)
        for c in self.clicks:
            disk = (yy - c.row) ** 2 + (xx - c.col) ** 2 <= self.radius**2
            mask = (mask | disk) if c.positive else (mask & ~disk)
        prob = np.where(mask, 0.495, 0.0).astype(np.float32) if self.with_prob else None
        return _Result(mask, self.canvas_size, prob)


class _DiskSegmenter:
    def __init__(self, radius: int, with_prob: bool = False) -> None:
        self.radius = radius
        self.with_prob = with_prob

    def start(self, image: np.ndarray, image_id: str | None = None, allow_padding: bool = False) -> _DiskSession:
        return _DiskSession(image.shape[:2], self.radius, self.with_prob)


def _disk_sample() -> Sample:
    gt = np.zeros((40, 50), np.int8)
    yy, xx = np.mgrid[:40, :50]
    gt[(yy - 20) ** 2 + (xx - 25) ** 2 <= 8**2] = 1
    ref = SampleRef("synthetic", "disk", "disk.png", "disk.png", "binary")
    return Sample(ref, np.zeros((40, 50, 3), np.uint8), gt)


def test_ritm_loop_records_clicks_and_ious_and_first_click_is_the_centre():
    sample = _disk_sample()
    res = evaluate_sample(_DiskSegmenter(8), sample, EvalConfig(max_clicks=4))
    assert res.clicks[0] == [20, 25, True]
    assert res.ious[0] == 1.0  # the disk segmenter reproduces the object from its centre
    assert len(res.ious) == len(res.clicks) == len(res.click_s) == 4
    # Perfect after click 1: RITM keeps clicking negatively at (0, 0), outside the object.
    assert res.clicks[1:] == [[0, 0, False]] * 3 and res.ious[1:] == [1.0] * 3


def test_ritm_loop_thresholds_probabilities_at_pred_thr():
    sample = _disk_sample()
    above = evaluate_sample(_DiskSegmenter(8, with_prob=True), sample, EvalConfig(max_clicks=1, pred_thr=0.49))
    below = evaluate_sample(_DiskSegmenter(8, with_prob=True), sample, EvalConfig(max_clicks=1, pred_thr=0.5))
    assert above.ious == [1.0] and below.ious == [0.0]


def test_interformer_loop_stops_clicking_when_nothing_is_wrong_and_is_seeded():
    sample = _disk_sample()
    res = evaluate_sample(_DiskSegmenter(8), sample, EvalConfig(protocol="interformer", max_clicks=3))
    assert res.clicks[0] == [20, 25, True] and res.ious == [1.0, 1.0, 1.0]
    assert res.clicks[1:] == [None, None] and all(t is not None for t in res.click_s)  # re-predicted
    # a small disk leaves errors: clicks continue, and the same seed gives the same clicks
    a = evaluate_sample(_DiskSegmenter(3), sample, EvalConfig(protocol="interformer", max_clicks=6, seed=1))
    b = evaluate_sample(_DiskSegmenter(3), sample, EvalConfig(protocol="interformer", max_clicks=6, seed=1))
    assert a.clicks == b.clicks and all(c is not None for c in a.clicks)
    assert a.ious[-1] > a.ious[0]


def _independent_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """IoU of `gt == 1` and `pred`, leaving GrabCut's 128 ignore band out (written here, not pipeline.metrics)."""
    valid = gt != 128
    obj, pred = (gt == 1) & valid, pred.astype(bool) & valid
    union = int((obj | pred).sum())
    return 1.0 if union == 0 else int((obj & pred).sum()) / union


def _edt(mask: np.ndarray) -> np.ndarray:
    """scipy's exact distance to the nearest False pixel, the outside of the image counting as False."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def _assert_click_follows_the_protocol(gt: np.ndarray, pred: np.ndarray, clicked: np.ndarray, click: list,
                                       ritm: bool) -> None:
    """The click lies at a deepest point of the larger error region (RITM: first in raster order)."""
    valid = gt != 128 if ritm else np.ones(gt.shape, bool)
    fn = (gt == 1) & ~pred & valid & ~clicked
    fp = (gt != 1) & pred & valid & ~clicked
    fn_d, fp_d = _edt(fn), _edt(fp)
    positive = fn_d.max() > fp_d.max()
    dist = fn_d if positive else fp_d
    row, col, sign = click
    assert sign == positive, (click, fn_d.max(), fp_d.max())
    assert dist[row, col] == pytest.approx(dist.max(), abs=1e-3), (click, dist[row, col], dist.max())
    if ritm:
        first = np.argwhere(dist >= dist.max() - 1e-3)[0]
        assert (row, col) == tuple(first)


def test_grabcut_baseline_on_a_real_sample():
    ref = resolve("GrabCut", DATA)[0]
    res = evaluate_ref(GrabCutBaseline(), ref, EvalConfig(max_clicks=3))
    sample = ref.load()
    session = GrabCutBaseline().start(sample.image)
    pred = np.zeros(sample.gt.shape, bool)
    clicked = np.zeros(sample.gt.shape, bool)
    for (row, col, pos), expected in zip(res.clicks, res.ious):
        # each recorded click is RITM's click for the mask before it, recomputed here with scipy
        _assert_click_follows_the_protocol(sample.gt, pred, clicked, [row, col, pos], ritm=True)
        clicked[row, col] = True
        out = session.add_click(row, col, pos)
        assert out.mask.shape == sample.gt.shape and out.padded_mask.shape[0] % 32 == 0
        pred = out.mask.astype(bool)
        assert _independent_iou(sample.gt, pred) == pytest.approx(expected)  # deterministic (seeded OpenCV RNG)
    assert res.ious[-1] > 0.5
    with pytest.raises(ValueError, match="outside"):
        session.add_click(sample.gt.shape[0], 0, True)


def test_results_file_round_trip_and_repair_of_a_cut_line(tmp_path):
    path = tmp_path / "r.jsonl"
    rec = SampleResult("d", "s1", "s1.png", "ritm", 2, 3, [0.5], [[0, 1, True]], 0.0, 0.1, [0.01], 0.2)
    append_results(path, [rec, SampleResult(**{**rec.__dict__, "sample_id": "s2"})])
    with open(path, "a") as f:
        f.write('{"dataset": "d", "sample_id": "s3", "io')  # interrupted write
    assert [r.sample_id for r in read_results(path)] == ["s1", "s2"]
    read_results(path, repair=True)
    assert path.read_text().endswith("\n") and path.read_text().count("\n") == 2
    append_results(path, [SampleResult(**{**rec.__dict__, "sample_id": "s3"})])
    assert [r.sample_id for r in read_results(path)] == ["s1", "s2", "s3"]


def test_a_model_on_each_benchmark_records_its_own_clicks_and_ious(tmp_path):
    """Both protocols with a real model: every click and IoU recorded is recomputed here, independently.

    The checkpoint's class bias is centred (tests/backend_support.py) so that its masks are neither empty
    nor full; a plain random model answers background everywhere and IoU 0 would prove nothing.
    """
    from backend_support import make_checkpoint

    spec = SegmenterSpec("checkpoint", checkpoint=str(make_checkpoint(tmp_path / "small.pth")))
    segmenter, replayer = spec.build(), spec.build()
    nontrivial = []
    for name, protocol in (("GrabCut", "ritm"), ("Berkeley", "interformer"), ("DAVIS", "ritm")):
        ref = resolve(name, DATA)[0]
        res = evaluate_ref(segmenter, ref, EvalConfig(protocol=protocol, max_clicks=3))
        assert len(res.ious) == len(res.clicks) == 3 and res.encode_s > 0
        sample = ref.load()
        session = replayer.start(sample.image, sample.image_id)
        ritm = protocol == "ritm"
        canvas = sample.gt.shape if ritm else tuple(session.canvas_size)
        gt = sample.gt if ritm else pad_to(sample.gt, canvas)
        pred, clicked = np.zeros(canvas, bool), np.zeros(canvas, bool)
        for click, recorded in zip(res.clicks, res.ious):
            if click is None:  # InterFormer's rule: nothing left to correct
                assert _independent_iou(gt, pred) == 1.0
                continue
            _assert_click_follows_the_protocol(gt, pred, clicked, click, ritm=ritm)
            clicked[click[0], click[1]] = True
            out = session.add_click(*click)
            pred = (np.asarray(out.prob) > 0.49) if ritm else np.asarray(out.padded_mask, bool)
            assert _independent_iou(gt, pred) == pytest.approx(recorded, abs=1e-9)
            nontrivial.append(0 < pred.sum() < pred.size)
    assert any(nontrivial)


def test_stored_features_give_the_same_evaluation_as_encoding(tmp_path):
    from pipeline.feature_store import EncodedImage, FeatureStore, feature_rows

    refs = resolve("GrabCut", DATA)[:1]
    spec = SegmenterSpec("random", variant="small")
    encoder = spec.build()
    items = [EncodedImage(r.image_id, r.image_path, "", encoder.predictor.encode(r.load().image)) for r in refs]
    store = FeatureStore(str(tmp_path / "db"))
    assert store.add(feature_rows(items, encoder.predictor.fingerprint, dtype="float32")) == 1
    stored = SegmenterSpec("random", variant="small", feature_db=str(tmp_path / "db")).build()
    config = EvalConfig(max_clicks=3)
    for ref in refs:
        a, b = evaluate_ref(encoder, ref, config), evaluate_ref(stored, ref, config)
        assert a.clicks == b.clicks and a.ious == b.ious
    stored.id_prefix = "data_GT/"  # ids of another encoded folder: not in this table
    with pytest.raises(KeyError, match="data_GT/"):
        evaluate_ref(stored, refs[0], config)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DISABLE_USAGE_STATS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_grabcut_baseline_on_three_benchmarks_resumes_and_compares(tmp_path):
    out = tmp_path / "gc"
    args = ["--baseline", "grabcut", "GrabCut", "Berkeley", "DAVIS", "--limit", "1", "--max-clicks", "3",
            "--output", str(out), "--num-cpus", "2"]
    first = _run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["dataset"] for r in results) == ["Berkeley", "DAVIS", "GrabCut"]
    assert all(len(r["ious"]) == 3 and len(r["clicks"]) == 3 for r in results)
    for name in ("results.csv", "summary.md", "summary.json", "miou.png", "run.json"):
        assert (out / name).stat().st_size > 0, name
    assert "NoC@85" in first.stdout and "GrabCut" in first.stdout
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 3 * 3
    # resumable: a second run finds everything done and does not start Ray
    second = _run_cli(*args)
    assert second.returncode == 0 and "0 to run" in second.stdout
    assert (out / "results.jsonl").read_text().count("\n") == 3
    # a different configuration in the same folder is refused
    clash = _run_cli(*args[:-4], "--max-clicks", "4", "--output", str(out))
    assert clash.returncode != 0 and "different run" in clash.stderr
    # summarise and overlay earlier runs only
    both = _run_cli("--compare", str(out), str(out / "results.jsonl"), "--output", str(tmp_path / "cmp"))
    assert both.returncode == 0, both.stderr[-3000:]
    assert (tmp_path / "cmp" / "miou.png").stat().st_size > 0
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert len(summary) == 6 and all(len(s["miou"]) == 3 for s in summary)
    # an untrained small model through the same harness, InterFormer protocol, overlaid on the baseline
    model = _run_cli("--random-init", "small", "GrabCut", "Berkeley", "DAVIS", "--limit", "1", "--max-clicks", "3",
                     "--protocol", "interformer", "--output", str(tmp_path / "rnd"), "--num-cpus", "2",
                     "--compare", str(out))
    assert model.returncode == 0, model.stderr[-3000:]
    rows = json.loads((tmp_path / "rnd" / "summary.json").read_text())
    assert [r["run"] for r in rows] == ["random-small-interformer"] * 3 + ["grabcut"] * 3
    assert all(r["timing"]["encode_s_per_image"] > 0 for r in rows[:3])


def test_cli_refuses_bad_input(tmp_path):
    no_model = _run_cli("GrabCut")
    assert no_model.returncode == 2 and "--baseline" in no_model.stderr
    bad = _run_cli("--baseline", "grabcut", "NoSuchSet", "--output", str(tmp_path / "x"))
    assert bad.returncode == 2 and "neither" in bad.stderr
