"""The InterFormer protocol against the released clicktest (`ClickSegmentor.interact_test`, spec §4.1, §4.4,
§7; evaluation-protocol.md §1.9), and the zoom-in choice of evaluation runs (audit 10, defects 1-4).

clicktest runs the network at every one of its steps on the padded canvas with roi=None: the click's disk is
stamped wherever the simulator put it (the padding included), and a step without a click still runs a
forward pass on the reference map the last prediction updated. NoC compares its float64 IoUs.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interformer.clicks import DEF_BG, DEF_FG, add_click_disk, initial_ref_label, update_by_prediction
from interformer.config import PreprocessConfig
from interformer.predictor import InvalidClickError, Predictor
from pipeline import evaluation_cli
from pipeline.clicker import interformer_next_click
from pipeline.datasets import Sample, SampleRef
from pipeline.evaluation import EvalConfig, SampleResult, evaluate_sample, pad_to, sample_rng
from pipeline.evaluation_report import summarize_run
from pipeline.evaluation_run import RunFolderError, prepare_output, run_settings, settings_conflicts
from pipeline.metrics import iou, mean_noc, noc, nof_ritm
from pipeline.segmenters import SegmenterSpec


def _sample(gt: np.ndarray, image: np.ndarray | None = None, sample_id: str = "s") -> Sample:
    h, w = gt.shape
    image = np.zeros((h, w, 3), np.uint8) if image is None else image
    return Sample(SampleRef("syn", sample_id, f"{sample_id}.png", f"{sample_id}.png", "binary"), image, gt)


# --- a toy canvas model: answers on the padded canvas, as a network does -------------------------------------

class _CanvasResult:
    def __init__(self, padded: np.ndarray, size: tuple[int, int]) -> None:
        self.padded_mask = padded
        self.mask = padded[: size[0], : size[1]]


class _CanvasSession:
    """A positive click predicts the object's rows and columns extended into the right/bottom padding (a
    model leaking past an object that touches the border); a negative click erases a radius-3 disk. Clicks
    in the padding are taken only when the session was opened with allow_padding, as a model session's."""

    def __init__(self, gt: np.ndarray, canvas: tuple[int, int], allow_padding: bool) -> None:
        self.gt, self.canvas_size, self.allow_padding = gt, canvas, allow_padding
        self.clicks: list[tuple[int, int, bool]] = []
        self.repredictions = 0

    def add_click(self, row: int, col: int, positive: bool) -> _CanvasResult:
        h, w = self.gt.shape if not self.allow_padding else self.canvas_size
        if not (0 <= row < h and 0 <= col < w):
            raise ValueError(f"click ({row}, {col}) outside {h}x{w}")
        self.clicks.append((row, col, positive))
        return self._predict()

    def repredict(self) -> _CanvasResult:
        self.repredictions += 1
        return self._predict()

    def _predict(self) -> _CanvasResult:
        hp, wp = self.canvas_size
        h, w = self.gt.shape
        rows, cols = np.nonzero(self.gt == 1)
        top, left, bottom, right = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
        bottom, right = (hp if bottom == h else bottom), (wp if right == w else right)
        m = np.zeros(self.canvas_size, bool)
        yy, xx = np.mgrid[:hp, :wp]
        for r, c, p in self.clicks:
            if p:
                m[top:bottom, left:right] = True
            else:
                m &= (yy - r) ** 2 + (xx - c) ** 2 > 9
        return _CanvasResult(m, (h, w))


class _CanvasSegmenter:
    def __init__(self, gt: np.ndarray) -> None:
        self.gt = gt
        self.sessions: list[_CanvasSession] = []

    def start(self, image: np.ndarray, image_id: str | None = None, allow_padding: bool = False) -> _CanvasSession:
        h, w = image.shape[:2]
        self.sessions.append(_CanvasSession(self.gt, (math.ceil(h / 32) * 32, math.ceil(w / 32) * 32), allow_padding))
        return self.sessions[-1]


def _clicktest(session, gt: np.ndarray, canvas: tuple[int, int], rng: np.random.Generator,
               max_clicks: int) -> tuple[list[float], list]:
    """clicktest's loop, transcribed: every step runs the model (the click, wherever it lies, or none)."""
    g = pad_to(gt, canvas)
    pred, made, ious, clicks = np.zeros(canvas, bool), [], [], []
    for _ in range(max_clicks):
        c = interformer_next_click(g, pred, made, rng)
        if c is None:
            res = session.repredict()
        else:
            made.append(c)
            res = session.add_click(c.row, c.col, c.positive)
        pred = np.asarray(res.padded_mask, bool)
        ious.append(iou(g, pred))
        clicks.append(None if c is None else [c.row, c.col, c.positive])
    return ious, clicks


@st.composite
def _border_objects(draw) -> np.ndarray:
    """A rectangle object touching the right or the bottom border (or both) of an image not a multiple of 32."""
    h, w = draw(st.integers(20, 60)), draw(st.integers(20, 60))
    if h % 32 == 0 and w % 32 == 0:  # no padding at all: nothing to test
        w += 1
    touch = draw(st.sampled_from(["right", "bottom", "both"]))
    top, left = draw(st.integers(0, h - 4)), draw(st.integers(0, w - 4))
    bottom = h if touch in ("bottom", "both") else draw(st.integers(top + 3, h - 1))
    right = w if touch in ("right", "both") else draw(st.integers(left + 3, w - 1))
    gt = np.zeros((h, w), np.int8)
    gt[top:bottom, left:right] = 1
    return gt


@settings(max_examples=60, deadline=None)
@given(gt=_border_objects(), seed=st.integers(0, 3))
def test_clicks_in_the_padding_are_given_to_the_model_as_clicktest_does(gt, seed):
    """Defect 2: a click on a false positive in the padding is stamped there and the step runs; the old loop
    kept it from the model, and every later click then fell on the neighbouring padding pixel."""
    seg = _CanvasSegmenter(gt)
    sample = _sample(gt)
    res = evaluate_sample(seg, sample, EvalConfig(protocol="interformer", max_clicks=12, seed=seed))
    session = seg.sessions[-1]
    replay = _CanvasSession(gt, session.canvas_size, allow_padding=True)
    ious, clicks = _clicktest(replay, gt, session.canvas_size, sample_rng(seed, "syn", "s"), 12)
    assert res.clicks == clicks and res.ious == ious
    assert [list(c) for c in session.clicks] == [c for c in res.clicks if c is not None]
    assert session.allow_padding
    h, w = gt.shape
    assert res.extra.get("outside_clicks", []) == [k for k, c in enumerate(clicks, 1)
                                                   if c is not None and (c[0] >= h or c[1] >= w)]


def test_the_audits_border_object_is_no_longer_frozen():
    """The audit's repro (pad_repro.py): the sample reached NoC85 6 under clicktest's rules, 20 before."""
    gt = np.zeros((40, 50), np.int8)
    gt[10:31, 30:50] = 1
    seg = _CanvasSegmenter(gt)
    res = evaluate_sample(seg, _sample(gt, sample_id="pad"), EvalConfig(protocol="interformer", max_clicks=20))
    assert res.extra["outside_clicks"]
    assert len(set(res.ious)) > 1 and noc(res.ious, 0.85, protocol="interformer") < 20


class _ForgetfulSession:
    """A click gives the object exactly; a step without a click (re-prediction) answers nothing."""

    def __init__(self, gt: np.ndarray) -> None:
        self.gt, self.canvas_size = gt, gt.shape

    def add_click(self, row: int, col: int, positive: bool) -> _CanvasResult:
        return _CanvasResult(self.gt == 1, self.gt.shape)

    def repredict(self) -> _CanvasResult:
        return _CanvasResult(np.zeros(self.gt.shape, bool), self.gt.shape)


class _ForgetfulSegmenter:
    def __init__(self, gt: np.ndarray) -> None:
        self.gt = gt

    def start(self, image, image_id=None, allow_padding=False) -> _ForgetfulSession:
        return _ForgetfulSession(self.gt)


def test_a_step_without_a_click_runs_the_model_again():
    """Defect 3: with nothing to click, clicktest still runs the step; its prediction (and IoU) can change.
    The RITM protocol always clicks and never re-predicts."""
    gt = np.zeros((32, 32), np.int8)
    gt[8:20, 8:20] = 1
    res = evaluate_sample(_ForgetfulSegmenter(gt), _sample(gt), EvalConfig(protocol="interformer", max_clicks=3))
    assert res.clicks[1] is None and res.clicks[0] is not None and res.clicks[2] is not None
    assert res.ious == [1.0, 0.0, 1.0]
    assert res.click_s[1] is not None  # the re-prediction is a model call
    ritm = evaluate_sample(_ForgetfulSegmenter(gt), _sample(gt), EvalConfig(protocol="ritm", max_clicks=3))
    assert ritm.ious == [1.0, 1.0, 1.0] and all(c is not None for c in ritm.clicks)


# --- a real refine-stage model against clicktest transcribed on the predictor's parts ------------------------

@pytest.fixture(scope="module")
def refine_spec(tmp_path_factory):
    from backend_support import make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "small_refine.pth", variant="small_refine")
    return SegmenterSpec("checkpoint", checkpoint=str(path), variant="small_refine")


@pytest.fixture(scope="module")
def refine_image():
    from backend_support import grabcut_images

    return grabcut_images(1, size=(40, 50))[0][1]


def _clicktest_on_predictor(predictor, image: np.ndarray, gt: np.ndarray, seed: int,
                            max_clicks: int) -> tuple[list[float], list]:
    """`ClickSegmentor.interact_test` on the project's network: roi=None at every step, the click disk stamped
    on the padded reference map wherever it lies, a forward pass at every step, then the prediction update."""
    feats = predictor.encode(image)
    canvas = tuple(feats.geometry.padded_size)
    g = pad_to(gt, canvas)
    rng = sample_rng(seed, "syn", "s")
    ref, pred, made, ious, clicks = initial_ref_label(canvas), np.zeros(canvas, bool), [], [], []
    for _ in range(max_clicks):
        c = interformer_next_click(g, pred, made, rng)
        if c is not None:
            made.append(c)
            ref = add_click_disk(ref, c.row, c.col, c.positive, predictor.model.config.clicks.inner_radius)
        pred = predictor.predict_margin(feats, ref, None) > 0
        ref = update_by_prediction(ref, pred)
        ious.append(iou(g, pred))
        clicks.append(None if c is None else [c.row, c.col, c.positive])
    return ious, clicks


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gt=_border_objects(), seed=st.integers(0, 3))
def test_a_refine_model_is_evaluated_as_clicktest_does(refine_spec, refine_image, gt, seed):
    """Defects 1-3 on a real refine-stage model: no zoom-in ROI, padding clicks stamped, re-prediction."""
    image = np.resize(refine_image, (*gt.shape, 3)).astype(np.uint8)
    segmenter = refine_spec.build()
    res = evaluate_sample(segmenter, _sample(gt, image), EvalConfig(protocol="interformer", max_clicks=6,
                                                                        seed=seed))
    ious, clicks = _clicktest_on_predictor(segmenter.predictor, image, gt, seed, 6)
    assert res.clicks == clicks
    np.testing.assert_array_equal(res.ious, ious)


def _rois(segmenter, sample: Sample, protocol: str, max_clicks: int = 5) -> list:
    rois = []
    original = segmenter.predictor.predict_margin

    def spy(feats, ref_label, roi, engine=None):
        rois.append(roi)
        return original(feats, ref_label, roi, engine)

    segmenter.predictor.predict_margin = spy
    evaluate_sample(segmenter, sample, EvalConfig(protocol=protocol, max_clicks=max_clicks))
    return rois


@pytest.mark.parametrize("protocol", ["ritm", "interformer"])
def test_evaluation_sessions_have_no_zoom_in_unless_asked(refine_spec, refine_image, protocol):
    """Defect 1: the released evaluation (ClickSegmentor) has no zoom-in; `zoom_in=True` is the demo's."""
    gt = np.zeros((40, 50), np.int8)
    gt[10:30, 12:40] = 1
    sample = _sample(gt, refine_image)
    assert _rois(refine_spec.build(), sample, protocol) == [None] * 5
    zoomed = _rois(replace(refine_spec, zoom_in=True).build(), sample, protocol)
    assert zoomed[:2] == [None, None] and all(r is not None for r in zoomed[2:])


def test_padding_clicks_are_a_session_option_and_the_default_still_refuses_them(refine_spec, refine_image):
    predictor = refine_spec.build().predictor
    feats = predictor.encode(refine_image)  # 40x50 -> 64x64 canvas
    with pytest.raises(InvalidClickError, match="outside the 40x50 image"):
        predictor.session(feats).add_click(45, 10, False)
    session = predictor.session(feats, allow_padding=True, zoom_in=False)
    session.add_click(45, 60, False)
    assert session.ref_label.shape == (64, 64)
    assert session.ref_label[45, 60] == DEF_BG and session.ref_label[45, 58] == DEF_BG
    session.add_click(20, 20, True)
    assert session.ref_label[20, 20] == DEF_FG
    with pytest.raises(InvalidClickError, match="outside the 64x64 padded canvas"):
        session.add_click(64, 0, True)
    resized = Predictor(predictor.model, PreprocessConfig(max_side=32), device="cpu")
    with pytest.raises(ValueError, match="native size"):
        resized.session(resized.encode(refine_image), allow_padding=True)


def test_repredict_runs_the_step_on_the_updated_reference_map(refine_spec, refine_image):
    predictor = refine_spec.build().predictor
    feats = predictor.encode(refine_image)
    session = predictor.session(feats, zoom_in=False)
    first = session.add_click(20, 25, True)
    ref = session.ref_label.copy()
    again = session.repredict()
    np.testing.assert_array_equal(again.margin, predictor.predict_margin(feats, ref, None))
    np.testing.assert_array_equal(session.ref_label, update_by_prediction(ref, again.padded_mask))
    assert session.clicks == list(first.clicks)
    assert session.undo() is None  # undo removes the click, re-predictions with it


# --- the zoom-in choice is recorded, and runs of the other choice are refused ---------------------------------

def test_the_zoom_in_choice_is_recorded_and_a_run_of_the_other_choice_is_refused(refine_spec, tmp_path):
    off = refine_spec
    on = replace(off, zoom_in=True)
    assert off.to_dict()["zoom_in"] is False and on.to_dict()["zoom_in"] is True
    assert on.default_name == off.default_name + "-zoomin"
    refs = [SampleRef("syn", "s", "s.png", str(tmp_path / "s.png"), "binary")]
    out = tmp_path / "run"
    prepare_output(out, run_settings("r", off, EvalConfig(), refs), overwrite=False)
    assert json.loads((out / "run.json").read_text())["segmenter"]["zoom_in"] is False
    with pytest.raises(RunFolderError, match="segmenter"):
        prepare_output(out, run_settings("r", on, EvalConfig(), refs), overwrite=False)
    # a refine model's run recorded before the option existed used the zoom-in: it is another run
    old = run_settings("r", off, EvalConfig(), refs)
    old["segmenter"].pop("zoom_in")
    assert settings_conflicts(old, run_settings("r", off, EvalConfig(), refs)) == ["segmenter"]


def test_zoom_in_is_left_out_where_it_cannot_change_results():
    for spec in (SegmenterSpec("random", variant="light"), SegmenterSpec("random", variant="small"),
                 SegmenterSpec("grabcut")):
        assert "zoom_in" not in spec.to_dict()
    assert SegmenterSpec("random", variant="tiny").to_dict()["zoom_in"] is False


def test_the_evaluate_command_line_has_the_zoom_in_option():
    doc = "evaluate\n\nexamples"
    args = evaluation_cli.parse_args("evaluate", doc, ["--random-init", "tiny", "GrabCut"])
    assert args.spec.zoom_in is False
    args = evaluation_cli.parse_args("evaluate", doc, ["--random-init", "tiny", "--zoom-in", "GrabCut"])
    assert args.spec.zoom_in is True and args.spec.default_name == "random-tiny-zoomin"
    with pytest.raises(SystemExit):
        evaluation_cli.parse_args("evaluate", doc, ["--baseline", "grabcut", "--zoom-in", "GrabCut"])


# --- NoC precision --------------------------------------------------------------------------------------------

def test_the_audits_float32_boundary_iou():
    x = 1800008 / 2000009  # 0.89999995...: rounds to 0.9 in float32
    assert noc([x] * 20, 0.90) == 1  # RITM: float32, as compute_noc_metric
    assert noc([x] * 20, 0.90, protocol="interformer") == 20  # clicktest: float64
    assert nof_ritm([[x] * 20], 0.90, protocol="interformer") == 1


@settings(max_examples=200, deadline=None)
@given(ious=st.lists(st.floats(0.0, 1.0) | st.sampled_from([np.nextafter(0.9, 0), np.nextafter(0.85, 0),
                                                             1800008 / 2000009]), min_size=1, max_size=20),
       thr=st.sampled_from([0.85, 0.90]))
def test_noc_compares_in_the_protocols_precision(ious, thr):
    def first(values, dtype):
        hits = [k for k, v in enumerate(values, 1) if dtype(v) >= dtype(thr)]
        return hits[0] if hits else 20

    assert noc(ious, thr, protocol="interformer") == first(ious, np.float64)
    assert noc(ious, thr, protocol="ritm") == first(ious, np.float32)
    assert mean_noc([ious], thr, protocol="interformer") == first(ious, np.float64)


def test_a_runs_summary_uses_its_protocols_precision():
    x = 1800008 / 2000009

    def result(protocol: str, sid: str) -> SampleResult:
        return SampleResult("d", sid, "i", protocol, 4, 4, [x] * 20, [[0, 0, True]] * 20, 0.0, 0.0, [None] * 20, 0.0)

    assert summarize_run("r", [result("interformer", "a")], 20)[0].summary.noc90 == 20
    assert summarize_run("r", [result("ritm", "a")], 20)[0].summary.noc90 == 1
    with pytest.raises(ValueError, match="several protocols"):
        summarize_run("r", [result("ritm", "a"), result("interformer", "b")], 20)
    with pytest.raises(ValueError, match="unknown protocol"):
        noc([x], 0.9, protocol="other")
