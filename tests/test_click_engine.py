"""Click engines (interformer.click_engine): the OpenVINO f32 engine passes the official parity fixtures, the
bf16 engine stays close to fp32, the torch engine is the unchanged reference, and every fallback is taken
with a logged reason. No timings are asserted (benchmarks live in bench/bench_model.py)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from interformer import Predictor, load_model
from interformer import click_engine, runtime
from interformer.click_engine import ClickEngineConfig, OpenVINOEngine, TorchEngine, build_engine, resolve_engine
from interformer.clicks import DEF_BG, DEF_FG, MAYBE_BG, MAYBE_FG, UNKNOWN, update_by_prediction

TOL = 1e-4  # the parity fixtures' tolerance (tests/test_model_parity.py)
MARGIN_EPS = 1e-4
AMX = {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f"}
NO_BF16 = {"avx2", "avx512f", "fma"}


def _official_cases(fixtures):
    for case in ("light_reference.npz", "light_reference_flex.npz"):
        ref = np.load(fixtures / case)
        yield case, ref, len(ref["clicks_row_col_ispos"])


@pytest.fixture(scope="module")
def light_engines(official_light, tmp_path_factory):
    model, fixtures = official_light
    cache = str(tmp_path_factory.mktemp("engine-cache"))
    torch_pred = Predictor(model, device="cpu")
    f32 = Predictor(model, device="cpu", engine=ClickEngineConfig("openvino-f32", cache_dir=cache))
    return torch_pred, f32, fixtures, cache


def test_openvino_f32_passes_the_official_parity_fixtures(light_engines):
    torch_pred, f32, fixtures, _ = light_engines
    assert f32.engine.name == "openvino-f32"
    for case, ref, n in _official_cases(fixtures):
        feats = torch_pred.encode(ref["image_rgb_uint8"])
        for k in range(1, n + 1):
            ref_in = ref[f"click{k}_ref_label_in"][0, 0]
            margin = f32.predict_margin(feats, ref_in, None)
            official = ref[f"click{k}_logits"][0, 1] - ref[f"click{k}_logits"][0, 0]
            np.testing.assert_allclose(margin, official, rtol=0, atol=2 * TOL, err_msg=f"{case} click {k}")
            differ = (margin > 0) != ref[f"click{k}_pred"][0, 0].astype(bool)
            assert np.all(np.abs(official[differ]) < MARGIN_EPS), f"{case} click {k}: mask differs at a large margin"


def test_openvino_bf16_masks_stay_close_to_fp32(light_engines):
    """bf16 keeps 8 significant bits: each rounding is <= 2^-9 relative and AMX accumulates in f32, so through
    the ~30 layers of the click network the margin moves by about 1 % of its scale (measured max error 0.021
    on margins up to 1.7, i.e. 1.3 %, with ConvPatchMerging; 0.020 with the traced graph). The tolerance is 3 %
    of max|margin|: the margin may move that much, and a pixel may change side only where the fp32 margin lies
    within that band of 0. These random official-init weights put half the pixels of the first click within 0.06
    of 0 (a worst case; trained weights are measured by bench/bench_engine_quality.py), so the IoU bound is 0.9
    (measured 0.916 to 0.996; 0.925 to 0.996 with the traced graph)."""
    torch_pred, _, fixtures, cache = light_engines
    engine = OpenVINOEngine(torch_pred.model, "bf16", click_engine.ClickEngineConfig(cache_dir=cache).cache_path)
    for case, ref, n in _official_cases(fixtures):
        feats = torch_pred.encode(ref["image_rgb_uint8"])
        cache_kv = torch_pred._ensure_cache(feats)
        for k in range(1, n + 1):
            ref_in = ref[f"click{k}_ref_label_in"][0, 0]
            exact = torch_pred.predict_margin(feats, ref_in, None)
            rl = torch.from_numpy(ref_in)[None, None]
            fast = engine.margin(feats.pyramid[0], rl, cache_kv, None)
            band = 0.03 * float(np.abs(exact).max())
            assert np.abs(fast - exact).max() <= band, f"{case} click {k}"
            differ = (fast > 0) != (exact > 0)
            assert np.all(np.abs(exact[differ]) <= band)
            union = ((fast > 0) | (exact > 0)).sum()
            assert union == 0 or ((fast > 0) & (exact > 0)).sum() / union >= 0.9


def test_torch_engine_is_the_model_decode_bit_for_bit(small_model):
    predictor = Predictor(small_model, device="cpu")
    assert predictor.engine.name == "torch"
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    feats = predictor.encode(image)
    ref = np.full(feats.geometry.padded_size, UNKNOWN, np.uint8)
    ref[40:50, 60:70] = DEF_FG
    with torch.inference_mode():
        logits = small_model.decode(list(feats.pyramid), torch.from_numpy(ref)[None, None],
                                    cache=predictor._ensure_cache(feats))
        want = torch.nn.functional.interpolate(logits[:, 1:2] - logits[:, 0:1], size=ref.shape, mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
    assert np.array_equal(predictor.predict_margin(feats, ref, None), want)


def test_fallback_without_native_bf16_is_f32_with_a_logged_reason(small_model, monkeypatch, caplog, tmp_path):
    engine, reasons = resolve_engine("openvino-bf16", small_model, torch.device("cpu"), flags=NO_BF16)
    assert engine == "openvino-f32" and "no native bf16" in reasons[0]
    assert resolve_engine("fast", small_model, torch.device("cpu"), flags=NO_BF16)[0] == "openvino-f32"
    assert resolve_engine("fast", small_model, torch.device("cpu"), flags=AMX) == ("openvino-bf16", [])
    monkeypatch.setattr(runtime, "cpu_flags", lambda: set(NO_BF16))
    with caplog.at_level(logging.WARNING, logger="interformer.click_engine"):
        predictor = Predictor(small_model, device="cpu",
                              engine=ClickEngineConfig("openvino-bf16", cache_dir=str(tmp_path)))
        assert predictor.engine.name == "openvino-f32"
        assert predictor.engine.name == "openvino-f32"  # built once: one log line
    assert len([r for r in caplog.records if "no native bf16" in r.getMessage()]) == 1


def test_fallback_to_torch_where_the_runtime_cannot_run(small_model, monkeypatch, caplog):
    refine = load_model(None, variant="small_refine", device="cpu")
    engine, reasons = resolve_engine("openvino-f32", refine, torch.device("cpu"), flags=AMX)
    assert engine == "torch" and "refine" in reasons[0]
    engine, reasons = resolve_engine("fast", small_model, torch.device("cuda"), flags=AMX)
    assert engine == "torch" and "cuda" in reasons[0]
    monkeypatch.setattr(click_engine, "openvino_available", lambda: "OpenVINO is not importable (test)")
    with caplog.at_level(logging.WARNING, logger="interformer.click_engine"):
        built = build_engine(ClickEngineConfig("fast"), small_model, torch.device("cpu"), flags=AMX)
    assert built.name == "torch"
    assert any("not importable" in r.getMessage() for r in caplog.records)


def test_a_size_the_runtime_cannot_compile_falls_back_to_torch(small_model, monkeypatch, caplog, tmp_path):
    import openvino

    def broken(*args, **kwargs):
        raise RuntimeError("conversion failed (test)")

    monkeypatch.setattr(openvino, "convert_model", broken)
    exact = Predictor(small_model, device="cpu")
    fast = Predictor(small_model, device="cpu", engine=ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path)))
    feats = exact.encode(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ref = np.full(feats.geometry.padded_size, UNKNOWN, np.uint8)
    with caplog.at_level(logging.WARNING, logger="interformer.click_engine"):
        for _ in range(2):
            assert np.array_equal(fast.predict_margin(feats, ref, None), exact.predict_margin(feats, ref, None))
    assert len([r for r in caplog.records if "conversion failed" in r.getMessage()]) == 1


def test_converted_models_are_reused_from_disk_and_wrong_shapes_are_refused(small_model, monkeypatch, caplog, tmp_path):
    cfg = ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path))
    first = Predictor(small_model, device="cpu", engine=cfg)
    feats_a = first.encode(np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    feats_b = first.encode(np.random.default_rng(3).integers(0, 256, (96, 64, 3), dtype=np.uint8))
    ref_a = np.full(feats_a.geometry.padded_size, UNKNOWN, np.uint8)
    ref_a[10:20, 30:40] = DEF_FG
    want = first.predict_margin(feats_a, ref_a, None)
    assert list(tmp_path.rglob("*.xml")), "the converted model is saved under the cache folder"

    import openvino

    monkeypatch.setattr(openvino, "convert_model", lambda *a, **k: pytest.fail("converted again"))
    second = Predictor(small_model, device="cpu", engine=cfg)
    assert np.array_equal(second.predict_margin(feats_a, ref_a, None), want)

    engine = second.engine
    cache_a, cache_b = second._ensure_cache(feats_a), second._ensure_cache(feats_b)
    rl_b = torch.from_numpy(np.full(feats_b.geometry.padded_size, UNKNOWN, np.uint8))[None, None]

    def signature(x0, rl, cache):
        return engine._signature([x0, rl, *(t for kv in cache.keys_values for t in kv)])

    # A compiled model handed inputs of another size (as a mixed-up cache key would) refuses them: the click is
    # answered by torch with a logged error, never with a guessed mask and never with an exception.
    wrong = signature(feats_b.pyramid[0], rl_b, cache_b)
    engine._compiled[wrong] = engine._compiled[signature(feats_a.pyramid[0], torch.from_numpy(ref_a)[None, None],
                                                         cache_a)]
    with caplog.at_level(logging.ERROR, logger="interformer.click_engine"), torch.inference_mode():
        got = engine.margin(feats_b.pyramid[0], rl_b, cache_b, None)
        assert np.array_equal(got, TorchEngine(small_model).margin(feats_b.pyramid[0], rl_b, cache_b, None))
    assert any(isinstance(r.msg, str) and "torch answers this click" in r.getMessage() for r in caplog.records)


def test_images_of_one_size_interleaved_on_one_engine_answer_as_on_their_own(small_model, tmp_path):
    """The engine copies an image's stride-4 map and keys/values into its infer request only when the image
    changes: clicks alternating between images of one padded size, and an image whose features replaced a
    freed one's (same ids possible), must answer exactly what a fresh engine answers for each alone."""
    import gc

    cfg = ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path))
    shared = Predictor(small_model, device="cpu", engine=cfg)
    images = [np.random.default_rng(s).integers(0, 256, (64, 96, 3), dtype=np.uint8) for s in (5, 6, 7)]
    feats = [shared.encode(im) for im in images[:2]]
    rng = np.random.default_rng(0)
    refs = []
    for _ in range(6):
        ref = np.full(feats[0].geometry.padded_size, UNKNOWN, np.uint8)
        r, c = rng.integers(0, 54), rng.integers(0, 86)
        ref[r:r + 10, c:c + 10] = DEF_FG
        refs.append(ref)

    def alone(image: np.ndarray, ref: np.ndarray) -> np.ndarray:
        own = Predictor(small_model, device="cpu", engine=cfg)
        return own.predict_margin(own.encode(image), ref, None)

    for n, ref in enumerate(refs):  # A, B, A, B, ...
        k = n % 2
        np.testing.assert_array_equal(shared.predict_margin(feats[k], ref, None), alone(images[k], ref))
    del feats
    gc.collect()
    fresh = shared.encode(images[2])
    for ref in refs[:2]:
        np.testing.assert_array_equal(shared.predict_margin(fresh, ref, None), alone(images[2], ref))


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="unknown click engine"):
        ClickEngineConfig("tensorrt")


def _update_reference(ref_label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    out = ref_label.copy()
    out[pred & (ref_label == UNKNOWN)] = MAYBE_FG
    out[pred & (ref_label == MAYBE_BG)] = UNKNOWN
    out[~pred & (ref_label == UNKNOWN)] = MAYBE_BG
    out[~pred & (ref_label == MAYBE_FG)] = UNKNOWN
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_update_by_prediction_table_equals_masked_writes(h, w, seed):
    rng = np.random.default_rng(seed)
    ref = rng.choice(np.array([DEF_BG, MAYBE_BG, UNKNOWN, MAYBE_FG, DEF_FG], np.uint8), size=(h, w))
    pred = rng.random((h, w)) < 0.5
    assert np.array_equal(update_by_prediction(ref, pred), _update_reference(ref, pred))


def test_one_engine_option_reaches_the_cli_evaluation_and_preannotation(small_model, tmp_path):
    from connectors.cli import build_parser
    from interformer.click_engine import click_engine_config
    from pipeline.encoding import EncoderSpec, build_predictor
    from pipeline.preannotation import WorkerSpec
    from pipeline.segmenters import SegmenterSpec

    args = build_parser().parse_args(["--variant", "small", "--click-engine", "fast", "--engine-cache", str(tmp_path)])
    cfg = click_engine_config(args)
    assert cfg == ClickEngineConfig("fast", cache_dir=str(tmp_path), compile="background")
    assert build_parser().parse_args(["--variant", "small"]).click_engine == "torch"  # exact fp32 by default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--variant", "small", "--click-engine", "gpu"])
    spec = SegmenterSpec("random", variant="small", engine="openvino-f32", engine_cache=str(tmp_path))
    assert spec.build().predictor.engine.name == "openvino-f32"
    with pytest.raises(ValueError, match="unknown click engine"):
        SegmenterSpec("random", variant="small", engine="gpu")
    assert WorkerSpec(encoder=None, db="db", table="t").engine == ClickEngineConfig()
    predictor = build_predictor(EncoderSpec(variant="small"), device="cpu", engine=cfg)
    assert predictor.engine_config == cfg


def test_background_compile_answers_with_torch_until_the_size_is_ready(small_model, tmp_path):
    exact = Predictor(small_model, device="cpu")
    cfg = ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path), compile="background")
    fast = Predictor(small_model, device="cpu", engine=cfg)
    feats = exact.encode(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ref = np.full(feats.geometry.padded_size, UNKNOWN, np.uint8)
    ref[20:30, 20:30] = DEF_FG
    want = exact.predict_margin(feats, ref, None)
    assert np.array_equal(fast.predict_margin(feats, ref, None), want)  # torch answered: bit-identical
    assert fast.engine.wait_ready(timeout=300)
    assert len(fast.engine._compiled) == 1 and next(iter(fast.engine._compiled.values()))[0] is not None
    np.testing.assert_allclose(fast.predict_margin(feats, ref, None), want, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="compile mode"):
        ClickEngineConfig("fast", compile="lazy")


def test_a_session_keeps_the_engine_of_its_first_click_across_a_background_compile(small_model, tmp_path):
    """With background compile torch answers a size until its compiled model is ready; a session started then
    stays on torch (steps, undo and replay never mix torch states with compiled ones) and a session started
    after runs wholly on the compiled engine."""
    from interformer.clicks import Click

    exact = Predictor(small_model, device="cpu")
    fast = Predictor(small_model, device="cpu",
                     engine=ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path), compile="background"))
    feats = exact.encode(np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    clicks = [Click(30, 30, True), Click(10, 50, False), Click(45, 12, True)]
    early = fast.session(feats)
    assert early.engine.name == "torch"
    early.add_click(*clicks[0])
    assert fast.engine.wait_ready(timeout=300)
    for n in (2, 3):
        want = exact.session(feats).replay(clicks[:n]).margin
        assert np.array_equal(early.add_click(*clicks[n - 1]).margin, want)  # still torch: bit-identical
    assert np.array_equal(early.undo().margin, exact.session(feats).replay(clicks[:2]).margin)
    late = fast.session(feats)
    assert late.engine.name == "openvino-f32"
    stepped = [late.add_click(*c).margin for c in clicks]
    assert np.array_equal(late.undo().margin, stepped[1])
    assert np.array_equal(fast.session(feats).replay(clicks[:2]).margin, stepped[1])
    np.testing.assert_allclose(stepped[1], exact.session(feats).replay(clicks[:2]).margin, rtol=0, atol=1e-3)


def test_compiled_click_networks_do_not_pin_threads_to_cores(small_model, tmp_path):
    """Processes that each run an engine (serving actors, pre-annotation workers) must not all pin their
    threads to the first cores: OpenVINO pins by default, which made two 1-thread actors share one core."""
    exact = Predictor(small_model, device="cpu")
    fast = Predictor(small_model, device="cpu", engine=ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path)))
    feats = exact.encode(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ref = np.full(feats.geometry.padded_size, UNKNOWN, np.uint8)
    fast.predict_margin(feats, ref, None)
    ((compiled, _, _),) = fast.engine._compiled.values()
    assert compiled.get_property("ENABLE_CPU_PINNING") is False


def _merging_input(c: int, h: int, w: int, offset: float, scale: float, ramp: float, seed: int):
    """A PatchMerging with random affine weights and an input with a constant offset and a spatial ramp."""
    from interformer.modeling.imsa import PatchMerging

    g = torch.Generator().manual_seed(seed)
    merging = PatchMerging(c, 2 * c)
    with torch.no_grad():
        for t in (merging.norm.weight, merging.norm.bias, merging.reduction.weight):
            t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if t is merging.norm.weight else 0.0))
    rows, cols = torch.linspace(-1, 1, h).reshape(1, 1, h, 1), torch.linspace(-1, 1, w).reshape(1, 1, 1, w)
    x = torch.randn(1, c, h, w, generator=g) * scale + offset + ramp * rows * cols
    return merging, x


MERGING_CASES = dict(h=st.integers(1, 19), w=st.integers(1, 19), c=st.sampled_from([4, 8, 16, 32]),
                     offset=st.floats(-8.0, 8.0), scale=st.floats(0.05, 4.0), ramp=st.floats(0.0, 20.0),
                     seed=st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(**MERGING_CASES)
@example(h=6, w=6, c=16, offset=8.0, scale=0.05, ramp=0.0, seed=1)  # far from zero mean: a plain E[p^2] - E[p]^2 fails
@example(h=19, w=19, c=32, offset=0.0, scale=0.3, ramp=20.0, seed=0)  # an offset that varies over the map
@example(h=13, w=13, c=16, offset=3.7666813632691443, scale=0.05, ramp=3.7666813632691443, seed=13)  # f32: 1.3e-6 x mag
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_patch_merging_is_patch_merging(dtype, h, w, c, offset, scale, ramp, seed):
    """The engines' rewrite of PatchMerging (strided convolutions, no unfold) computes the same function: against
    float64, its error in f32 and in bf16 stays within a small factor of PatchMerging's own error in that precision
    (odd sizes, activations far from zero mean and offsets that vary over the map included). A statistic taken as a
    difference of squares fails this in bf16 by orders of magnitude on the ramps."""
    import copy

    from interformer.click_engine import ConvPatchMerging

    merging, x = _merging_input(c, h, w, offset, scale, ramp, seed)
    rewrite = ConvPatchMerging(merging)
    with torch.no_grad():
        want = copy.deepcopy(merging).double()(x.double())
        x_low = x.to(dtype)
        own = (copy.deepcopy(merging).to(dtype)(x_low).double() - want).abs().max().item()
        got = rewrite.to(dtype)(x_low)
    assert got.shape == want.shape and got.dtype == dtype
    err = (got.double() - want).abs().max().item()
    # f32: the rewrite sums in another order, a few ulps of the output's magnitude beyond 3x PatchMerging's own
    # error (1.3e-6 x magnitude the worst hypothesis found; 0.6e-6 over 1500 random cases): 4e-6 x magnitude.
    floor = (4e-6 if dtype == torch.float32 else 1e-2) * max(1.0, want.abs().max().item())
    assert err <= 3 * own + floor, (err, own)


def test_a_relative_engine_cache_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray workers and actors run in other working directories: a relative --engine-cache would give each its
    own cache (or none it can write), so every command line makes it absolute when it is parsed."""
    import jobs.encode
    from connectors.cli import build_parser
    from pipeline import evaluation_cli

    monkeypatch.chdir(tmp_path)
    expected = str(tmp_path / "engines")
    assert build_parser().parse_args(["--variant", "small", "--engine-cache", "engines"]).engine_cache == expected
    assert jobs.encode.build_parser().parse_args(["imgs", "--engine-cache", "engines"]).engine_cache == expected
    args = evaluation_cli.parse_args("interformer-evaluate", "", ["--baseline", "grabcut", "GrabCut",
                                                                   "--engine-cache", "engines"])
    assert args.engine_cache == expected
