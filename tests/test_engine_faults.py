"""Faults of the OpenVINO click engine and its on-disk cache (interformer.click_engine, interformer.runtime):
any label-map dtype answers as torch and never poisons a cached size; the compiled sizes held are bounded; the
cache never follows a planted link; a failed or killed conversion leaves nothing behind; a stalled lock holder
delays others only up to a deadline. Real OpenVINO models throughout (a tiny one where the cache alone is tested)."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interformer import Predictor, runtime
from interformer.click_engine import ClickEngineConfig
from interformer.clicks import DEF_FG, UNKNOWN

openvino = pytest.importorskip("openvino")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # the parity fixtures' tolerance (tests/test_model_parity.py)
MARGIN_EPS = 1e-4
LABEL_DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.bool_]


def _image(h: int, w: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _label_map(size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ref = np.full(size, UNKNOWN, np.uint8)
    r, c = rng.integers(0, size[0] - 10), rng.integers(0, size[1] - 10)
    ref[r:r + 10, c:c + 10] = DEF_FG
    ref[rng.random(size) < 0.05] = rng.integers(0, 5)
    return ref


def _assert_same_masks(got: np.ndarray, want: np.ndarray) -> None:
    assert np.abs(got - want).max() < TOL
    differ = (got > 0) != (want > 0)
    assert np.all(np.abs(want[differ]) < MARGIN_EPS), "mask differs from torch's at a large margin"


@pytest.fixture(scope="module")
def exact(small_model):
    return Predictor(small_model, device="cpu")


@pytest.fixture(scope="module")
def feats64(exact):
    return exact.encode(_image(64, 64))


# 1. input dtypes ------------------------------------------------------------------------------------------------

@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.sampled_from(LABEL_DTYPES), min_size=2, max_size=4), seed=st.integers(0, 2**16))
def test_any_label_map_dtype_answers_as_torch_and_poisons_no_size(small_model, exact, feats64, tmp_path_factory,
                                                                   caplog, order, seed):
    """The first dtype seen used to be baked into the size's IR and in-memory entry: every later click of another
    dtype (the sessions' own uint8 ones included) raised EngineShapeError."""
    cfg = ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path_factory.mktemp("dtypes")))
    fast = Predictor(small_model, device="cpu", engine=cfg)
    ref = _label_map(feats64.geometry.padded_size, seed)
    compiled = None
    with caplog.at_level(logging.WARNING, logger="interformer"):
        for dtype in [*order, np.uint8]:
            rl = ref.astype(dtype)
            got = fast.predict_margin(feats64, rl, None)
            _assert_same_masks(got, exact.predict_margin(feats64, rl, None))
            if dtype is not np.bool_:  # the same values: the same compiled model, bit for bit
                compiled = got if compiled is None else compiled
                np.testing.assert_array_equal(got, compiled)
        session = fast.session(feats64)
        assert session.engine is fast.engine
        _assert_same_masks(session.add_click(30, 30).margin, exact.session(feats64).add_click(30, 30).margin)
    assert not [r for r in caplog.records if "fallback" in r.getMessage()], "every dtype ran on the engine"
    assert len(fast.engine._compiled) == 1, "one compiled model serves every dtype of a size"


def test_an_int64_map_in_another_process_leaves_the_cache_usable(small_model, exact, feats64, tmp_path):
    """The audit's repro: a script's predict_margin with np.full(size, UNKNOWN) (int64) in one process, then
    normal uint8 clicks in a fresh process on the same cache."""
    script = f"""
import sys, numpy as np, torch
sys.path.insert(0, {str(ROOT)!r})
from interformer import Predictor, load_model
from interformer.click_engine import ClickEngineConfig
from interformer.clicks import UNKNOWN
torch.manual_seed(0)
model = load_model(None, variant="small", device="cpu")
p = Predictor(model, device="cpu", engine=ClickEngineConfig("openvino-f32", cache_dir={str(tmp_path)!r}))
feats = p.encode(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
p.predict_margin(feats, np.full(feats.geometry.padded_size, UNKNOWN), None)
print("ENTRIES", len(p.engine._compiled))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ENTRIES 1" in done.stdout
    fresh = Predictor(small_model, device="cpu", engine=ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path)))
    for dtype in (np.uint8, np.int64, np.int32):
        ref = _label_map(feats64.geometry.padded_size, 1).astype(dtype)
        _assert_same_masks(fresh.predict_margin(feats64, ref, None), exact.predict_margin(feats64, ref, None))
    session = fresh.session(feats64)
    _assert_same_masks(session.add_click(20, 40).margin, exact.session(feats64).add_click(20, 40).margin)
    assert [e[0] is not None for e in fresh.engine._compiled.values()] == [True]


def test_a_label_map_no_cast_keeps_answers_on_torch(small_model, exact, feats64, tmp_path, caplog):
    """A float label map (torch reads it with .long()) is not cast: torch answers it, with one logged line."""
    fast = Predictor(small_model, device="cpu", engine=ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path)))
    ref = _label_map(feats64.geometry.padded_size, 2).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="interformer.click_engine"):
        for _ in range(2):
            np.testing.assert_array_equal(fast.predict_margin(feats64, ref, None),
                                          exact.predict_margin(feats64, ref, None))
    assert len([r for r in caplog.records if "float32" in r.getMessage()]) == 1


# 2. bounded compiled sizes -------------------------------------------------------------------------------------

def test_compiled_sizes_are_bounded_and_evicted_ones_recompile_from_disk(small_model, exact, tmp_path, monkeypatch):
    cfg = ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path), max_sizes=2)
    fast = Predictor(small_model, device="cpu", engine=cfg)
    feats = [fast.encode(_image(h, w, s)) for s, (h, w) in enumerate([(64, 64), (64, 96), (96, 64), (32, 64)])]
    refs = [_label_map(f.geometry.padded_size, i) for i, f in enumerate(feats)]
    first = []
    for f, ref in zip(feats, refs):
        first.append(fast.predict_margin(f, ref, None))
        _assert_same_masks(first[-1], exact.predict_margin(f, ref, None))
        assert len(fast.engine._compiled) <= 2
    assert len(list(tmp_path.rglob("click_*.xml"))) == 4

    monkeypatch.setattr(openvino, "convert_model", lambda *a, **k: pytest.fail("converted again"))
    for f, ref, want in zip(feats, refs, first):  # every size again: the evicted ones read from the disk cache
        np.testing.assert_array_equal(fast.predict_margin(f, ref, None), want)
        assert len(fast.engine._compiled) <= 2


def test_a_session_pinned_to_an_evicted_size_stays_on_the_engine(small_model, tmp_path):
    """Background mode answers a new size with torch, but a session that began on the compiled model must keep
    it after its size was evicted (no torch state mixed into its clicks)."""
    blocking = Predictor(small_model, device="cpu",
                         engine=ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path), max_sizes=1))
    serving = Predictor(small_model, device="cpu", engine=ClickEngineConfig(
        "openvino-f32", cache_dir=str(tmp_path), compile="background", max_sizes=1))
    a, b = serving.encode(_image(64, 64)), serving.encode(_image(64, 96))
    for f in (a, b):
        blocking.predict_margin(f, _label_map(f.geometry.padded_size, 0), None)  # both IRs on disk
    serving.click_engine_for(a)
    assert serving.engine.wait_ready(120)
    session = serving.session(a)
    assert session.engine is serving.engine
    session.add_click(10, 10)
    serving.click_engine_for(b)  # the other size compiles and evicts a's
    assert serving.engine.wait_ready(120)
    assert len(serving.engine._compiled) == 1
    got = session.add_click(40, 40, False)
    want = blocking.session(a)
    want.add_click(10, 10)
    np.testing.assert_array_equal(got.margin, want.add_click(40, 40, False).margin)


class _FailingRequest:
    """An infer request whose runs fail the way OpenVINO's do when memory runs out (a RuntimeError from
    infer()); its buffers are the real request's. Counts the runs it was asked for."""

    def __init__(self, request) -> None:
        self.request, self.runs = request, 0

    def infer(self):
        self.runs += 1
        raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp: std::bad_alloc (test)")

    def get_input_tensor(self, i):
        return self.request.get_input_tensor(i)

    def get_output_tensor(self, i):
        return self.request.get_output_tensor(i)


def test_a_click_the_runtime_fails_to_run_is_answered_by_torch_and_its_size_stays_there(small_model, exact,
                                                                                        tmp_path, caplog):
    """A failure inside infer() (not at conversion) used to surface as the click's error (an HTTP 500 in the
    backend, a failed image in pre-annotation): now torch answers, bit for bit the reference, that click and
    every later one of its size, sessions pinned to the engine included; other sizes stay on the engine."""
    fast = Predictor(small_model, device="cpu", engine=ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path)))
    a, b = fast.encode(_image(64, 64)), fast.encode(_image(64, 96, 5))
    ref_a, ref_b = _label_map(a.geometry.padded_size, 0), _label_map(b.geometry.padded_size, 1)
    fast.predict_margin(a, ref_a, None)
    session = fast.session(a)
    assert session.engine is fast.engine
    (signature, (compiled, request, lock)), = fast.engine._compiled.items()
    failing = _FailingRequest(request)
    fast.engine._compiled[signature] = (compiled, failing, lock)
    with caplog.at_level(logging.WARNING, logger="interformer.click_engine"):
        for _ in range(2):
            np.testing.assert_array_equal(fast.predict_margin(a, ref_a, None), exact.predict_margin(a, ref_a, None))
        np.testing.assert_array_equal(session.add_click(30, 30).margin,
                                      exact.session(a).add_click(30, 30).margin)
        _assert_same_masks(fast.predict_margin(b, ref_b, None), exact.predict_margin(b, ref_b, None))
    assert failing.runs == 1, "a size that failed to run is not run again"
    assert len(fast.engine._compiled) == 1 and signature not in fast.engine._compiled, "the other size compiled"
    assert len([r for r in caplog.records if "bad_alloc" in r.getMessage()]) == 1


def test_another_openvino_release_never_reads_a_cached_model(small_model, exact, feats64, tmp_path, monkeypatch):
    """The cache key holds OpenVINO's release: an IR converted (its graph chosen) by one release is converted
    anew by another and left in place for the first."""
    ref = _label_map(feats64.geometry.padded_size, 4)
    engine = ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path))
    Predictor(small_model, device="cpu", engine=engine).predict_margin(feats64, ref, None)
    before = {p: p.read_bytes() for p in tmp_path.rglob("click_*")}
    monkeypatch.setattr(openvino, "__version__", "2099.1.0-1-abc-releases/2099/1")
    upgraded = Predictor(small_model, device="cpu", engine=engine)
    _assert_same_masks(upgraded.predict_margin(feats64, ref, None), exact.predict_margin(feats64, ref, None))
    after = sorted(p.name for p in tmp_path.rglob("click_*.xml"))
    assert len(after) == 2 and any("ov2099_1_0" in name for name in after), after
    assert all(p.read_bytes() == data for p, data in before.items()), "the first release's entry is untouched"


def test_the_bound_is_one_option_of_the_backend_evaluation_and_preannotation(tmp_path):
    from connectors.cli import build_parser
    from connectors.preannotate_cli import build_parser as preannotate_parser
    from interformer.click_engine import DEFAULT_MAX_SIZES, click_engine_config
    from pipeline.evaluation_cli import build_parser as evaluation_parser
    from pipeline.evaluation_cli import build_spec

    assert click_engine_config(build_parser().parse_args(["--variant", "small"])).max_sizes == DEFAULT_MAX_SIZES
    args = build_parser().parse_args(["--variant", "small", "--engine-max-sizes", "3"])
    assert click_engine_config(args).max_sizes == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--variant", "small", "--engine-max-sizes", "0"])
    for parser in (preannotate_parser("p", "doc"), evaluation_parser("e", "doc")):
        assert any("--engine-max-sizes" in a.option_strings for a in parser._actions)
    spec = build_spec(evaluation_parser("e", "doc").parse_args(["--random-init", "small", "--engine-max-sizes", "5"]))
    assert spec.engine_config.max_sizes == 5
    assert "engine_max_sizes" not in spec.to_dict()
    with pytest.raises(ValueError, match="max_sizes"):
        ClickEngineConfig("openvino-f32", max_sizes=0)


# 3.-5. the cache's files and lock ------------------------------------------------------------------------------

def _tiny_model(n: int = 50_000):
    import openvino.opset13 as ops

    x = ops.parameter([1, n], np.float32)
    return openvino.Model([ops.add(x, ops.constant(np.arange(n, dtype=np.float32)[None]))], [x], "tiny")


def _temps(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp" in n)


def test_planted_links_at_the_lock_and_temp_names_leave_their_targets_untouched(tmp_path):
    entry = tmp_path / "cache" / "entry.xml"
    entry.parent.mkdir()
    victims = {}
    planted = [entry.with_suffix(".lock")] + [entry.with_suffix(f".tmp{os.getpid()}{s}") for s in (".xml", ".bin")]
    planted.append(entry.parent / f"entry.tmp{os.getpid()}.sha256")
    for i, link in enumerate(planted):
        victim = tmp_path / f"victim{i}.txt"
        victim.write_text(f"important data {i}")
        link.symlink_to(victim)
        victims[victim] = victim.read_text()
    model = runtime.read_or_convert(openvino.Core(), entry, _tiny_model, logging.getLogger("test"))
    assert len(model.inputs) == 1 and runtime.read_ir(openvino.Core(), entry) is not None
    for victim, text in victims.items():
        assert victim.read_text() == text, f"{victim} was written through a planted link"


_FSIZE_SCRIPT = """
import json, logging, resource, sys
sys.path.insert(0, {root!r})
import numpy as np, openvino, openvino.opset13 as ops
from pathlib import Path
from interformer import runtime
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # a disk that fills up mid-write
x = ops.parameter([1, 200_000], np.float32)
model = openvino.Model([ops.add(x, ops.constant(np.ones((1, 200_000), np.float32)))], [x], "big")
try:
    runtime.read_or_convert(openvino.Core(), Path({entry!r}), lambda: model, logging.getLogger("t"))
    print(json.dumps({{"error": None}}))
except Exception as e:
    print(json.dumps({{"error": str(e), "type": type(e).__name__}}))
"""


def test_a_conversion_that_fails_to_write_leaves_no_temp_file_and_says_why(tmp_path):
    entry = tmp_path / "cache" / "entry.xml"
    done = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT.format(root=str(ROOT), entry=str(entry))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["type"] == "CacheWriteError"
    assert str(entry) in out["error"] and "EFBIG" in out["error"], out["error"]
    assert _temps(entry.parent) == [], "the failed conversion's files were removed"
    assert not entry.exists()
    runtime.read_or_convert(openvino.Core(), entry, _tiny_model, logging.getLogger("test"))  # then it works


def test_temp_files_of_dead_processes_are_removed_by_the_next_conversion(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "cache"
    stale_dir = folder / f"{runtime.TMP_PREFIX}{socket.gethostname()}-{dead.pid}-abcd1234"
    stale_dir.mkdir(parents=True)
    (stale_dir / "other.bin").write_bytes(b"x" * 1000)
    legacy = [folder / f"other.tmp{dead.pid}.bin", folder / f"other.tmp{dead.pid}.xml"]
    for f in legacy:
        f.write_bytes(b"partial")
    live = folder / f"{runtime.TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-live0000"
    live.mkdir()  # a conversion under way in a live process (this one) is left alone
    foreign = folder / f"{runtime.TMP_PREFIX}another-host-{dead.pid}-abcd1234"
    foreign.mkdir()  # another machine's (a shared cache): its pids are not ours to judge
    runtime.read_or_convert(openvino.Core(), folder / "entry.xml", _tiny_model, logging.getLogger("test"))
    assert _temps(folder) == sorted([live.name, foreign.name])


def _hold_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _answers_within(fn, seconds: float):
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # reported to the test below
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_a_stalled_lock_holder_delays_a_conversion_only_up_to_the_deadline(tmp_path, caplog):
    entry = tmp_path / "cache" / "entry.xml"
    fd = _hold_lock(entry.with_suffix(".lock"))  # another open file: flock excludes it as another process's
    try:
        with caplog.at_level(logging.WARNING, logger="test"):
            start = time.monotonic()
            model = _answers_within(lambda: runtime.read_or_convert(
                openvino.Core(), entry, _tiny_model, logging.getLogger("test"), lock_wait_s=0.5), 60)
        assert model is not None and time.monotonic() - start >= 0.5
        assert any("still held" in r.getMessage() for r in caplog.records)
    finally:
        os.close(fd)


def test_a_click_is_answered_while_another_process_holds_its_size_lock(small_model, exact, feats64, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(runtime, "LOCK_WAIT_S", 1.0)
    fast = Predictor(small_model, device="cpu", engine=ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path)))
    ref = _label_map(feats64.geometry.padded_size, 4)
    cache = fast._ensure_cache(feats64)
    inputs = [feats64.pyramid[0], torch.from_numpy(ref)[None, None], *(t for kv in cache.keys_values for t in kv)]
    fd = _hold_lock(fast.engine._ir_path(fast.engine._signature(inputs)).with_suffix(".lock"))
    try:
        got = _answers_within(lambda: fast.predict_margin(feats64, ref, None), 120)
    finally:
        os.close(fd)
    _assert_same_masks(got, exact.predict_margin(feats64, ref, None))
    assert [e[0] is not None for e in fast.engine._compiled.values()] == [True]
