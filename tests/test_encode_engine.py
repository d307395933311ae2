"""The OpenVINO image encoder (interformer.encode_engine): the same function as the torch backbone at every size
and batch from one conversion, a cache that is reused, repaired and shared, and a logged fallback to torch
wherever the runtime cannot run."""
from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from interformer import Predictor, load_model
from interformer import encode_engine, runtime
from interformer.click_engine import ClickEngineConfig
from interformer.encode_engine import (
    EncoderNetwork,
    OpenVINOEncoder,
    TorchEncoder,
    build_encoder,
    resolve_encode_engine,
    token_index,
)

openvino = pytest.importorskip("openvino")

AMX = {"avx512f", "amx_bf16", "amx_tile"}
NO_BF16 = {"avx2", "fma", "avx512f"}
CPU = torch.device("cpu")


def _rel_rms(want: torch.Tensor, got: torch.Tensor) -> float:
    return float((want - got).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return load_model(None, variant="small", device="cpu").eval()


@pytest.fixture(scope="module")
def f32_encoder(small_model, tmp_path_factory):
    encoder = OpenVINOEncoder(small_model.backbone, "fp32", tmp_path_factory.mktemp("encoder-cache"))
    encoder(torch.zeros(1, 3, 64, 64))  # converts once for the module
    assert encoder._request is not None, encoder._failed
    return encoder


sizes = st.tuples(st.integers(1, 20), st.integers(1, 20)).map(lambda hw: (32 * hw[0], 32 * hw[1]))


@settings(max_examples=25, deadline=None)
@given(size=sizes, batch=st.integers(1, 2), seed=st.integers(0, 2**16))
@example(size=(256, 1024), batch=1, seed=0)  # 16 x 64 = the training grid's 1024 tokens: tables unresized
@example(size=(1024, 256), batch=1, seed=0)
def test_encoder_network_is_the_backbone_bit_for_bit(small_model, size, batch, seed):
    """The graph written for the runtime: the size-dependent position embedding and bias as gathers by
    `token_index`, the same numbers as the backbone's own nearest resize at every grid (the training grid is
    32 x 32 here; the sizes go from 2 x 2 to 40 x 40 patches, both sides independently)."""
    img = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    grid = (size[0] // 16, size[1] // 16)
    with torch.no_grad():
        want = small_model.backbone(img)
        got = EncoderNetwork(small_model.backbone)(img, token_index(grid, small_model.backbone.cfg.window))
    assert all(torch.equal(w, g) for w, g in zip(want, got))


def test_token_index_is_the_identity_at_the_training_grid():
    assert torch.equal(token_index((32, 32), 32), torch.arange(1 + 32 * 32))
    index = token_index((2, 3), 4)
    assert index[0] == 0 and index.shape == (7,) and int(index.max()) <= 16


@settings(max_examples=20, deadline=None)
@given(size=sizes, batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_openvino_f32_computes_the_backbone_at_every_size_from_one_conversion(small_model, f32_encoder, size, batch,
                                                                              seed):
    """One dynamic-shape conversion answers any batch and padded size; f32 is the same function as torch fp32:
    relative RMS per level ~4e-7 measured here (Light: <= 9e-6 at 1024², bench/bench_encode_runtime.py), so
    1e-5 is a bound no real difference (a wrong index, a baked size) can pass under."""
    img = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = small_model.backbone(img)
    got = f32_encoder(img)
    assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
    assert all(g.dtype == torch.float32 for g in got)
    assert max(_rel_rms(w, g) for w, g in zip(want, got)) < 1e-5


@pytest.mark.skipif(not runtime.native_bf16(), reason="this CPU has no native bf16")
def test_openvino_bf16_is_close_to_fp32(small_model, f32_encoder):
    """bf16 (8 mantissa bits, ~0.4 % per rounding) keeps the pyramid within ~1 % RMS of fp32 (measured 1.0-1.1 %
    on Light, the same order as torch's bf16 autocast); 3 % leaves room for a small random model and would not
    pass a wrong graph (errors of order 100 %)."""
    bf16 = OpenVINOEncoder(small_model.backbone, "bf16", f32_encoder.cache_dir)
    img = torch.randn(2, 3, 320, 448, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = small_model.backbone(img)
    errors = [_rel_rms(w, g) for w, g in zip(want, bf16(img))]
    assert bf16.name == "openvino-bf16" and max(errors) < 0.03 and min(errors) > 1e-4  # bf16 really ran


def test_the_cached_conversion_is_reused_and_keyed_by_the_weights(small_model, f32_encoder, monkeypatch):
    path = f32_encoder.ir_path()
    assert path.is_file() and path.with_suffix(".bin").is_file()
    monkeypatch.setattr(openvino, "convert_model", lambda *a, **k: pytest.fail("converted again"))
    again = OpenVINOEncoder(small_model.backbone, "fp32", f32_encoder.cache_dir)
    img = torch.randn(1, 3, 96, 160)
    assert torch.equal(again(img)[0], f32_encoder(img)[0])
    torch.manual_seed(1)
    other = load_model(None, variant="small", device="cpu")
    assert OpenVINOEncoder(other.backbone, "fp32", f32_encoder.cache_dir).ir_path() != path


# Which damage is found is the digest's business (tests/test_engine_cache.py: any changed byte of either file, a
# missing file); each kind then takes one repair path, shown here for the encoder by the damage OpenVINO would
# read without complaint. Each case converts the whole encoder (~10 s), so the kinds are not repeated here.
@pytest.mark.parametrize("damage", ["one weight byte changed"])
def test_a_damaged_cache_entry_is_converted_again(small_model, tmp_path, caplog, damage):
    first = OpenVINOEncoder(small_model.backbone, "fp32", tmp_path)
    img = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(3))
    want = first(img)
    path = first.ir_path()
    weights = path.with_suffix(".bin")
    data = bytearray(weights.read_bytes())
    if damage == "truncated weights":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "one weight byte changed":  # reads fine and would answer wrongly without the digest
        data[len(data) // 3] ^= 0x40
        weights.write_bytes(data)
    elif damage == "no digest":  # an entry saved before digests, or copied without its .sha256
        runtime.digest_path(path).unlink()
    else:
        path.write_text("<net>not a model")
    with caplog.at_level(logging.WARNING, logger="interformer.encode_engine"):
        got = OpenVINOEncoder(small_model.backbone, "fp32", tmp_path)(img)
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(w, g) for w, g in zip(want, got))


def test_encoders_starting_together_convert_once(small_model, tmp_path, monkeypatch):
    """Actors on one node start at the same time: the cache's file lock lets one convert and the others read."""
    conversions = []
    real = openvino.convert_model
    monkeypatch.setattr(openvino, "convert_model", lambda *a, **k: conversions.append(1) or real(*a, **k))
    encoders = [OpenVINOEncoder(small_model.backbone, "fp32", tmp_path) for _ in range(3)]
    img = torch.randn(1, 3, 64, 96)
    results: list = [None] * 3
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, encoders[i](img))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(conversions) == 1
    assert all(e._request is not None for e in encoders)
    assert all(torch.equal(results[0][k], r[k]) for r in results[1:] for k in range(4))


def test_resolution_and_fallbacks_are_logged(small_model, monkeypatch, caplog):
    assert resolve_encode_engine("openvino", "bf16", CPU, flags=AMX) == ("openvino", "bf16", [])
    engine, precision, reasons = resolve_encode_engine("openvino", "bf16", CPU, flags=NO_BF16)
    assert (engine, precision) == ("openvino", "fp32") and "no native bf16" in reasons[0]
    engine, _, reasons = resolve_encode_engine("openvino", "fp32", torch.device("cuda"), flags=AMX)
    assert engine == "torch" and "cuda" in reasons[0]
    assert resolve_encode_engine("torch", "bf16", CPU, flags=NO_BF16) == ("torch", "bf16", [])
    with pytest.raises(ValueError, match="encode engine"):
        resolve_encode_engine("onnx", "fp32", CPU)
    with pytest.raises(ValueError, match="encode precision"):
        resolve_encode_engine("torch", "fp16", CPU)
    from pipeline.encoding import EncoderSpec

    with pytest.raises(ValueError, match="encode engine"):  # the job's spec refuses it before any actor starts
        EncoderSpec(variant="small", engine="onnx")
    monkeypatch.setattr(encode_engine, "openvino_available", lambda: "OpenVINO is not importable (test)")
    with caplog.at_level(logging.WARNING, logger="interformer.encode_engine"):
        built = build_encoder("openvino", "fp32", small_model.backbone, CPU, cache_dir=None, flags=AMX)
    assert isinstance(built, TorchEncoder) and any("not importable" in r.getMessage() for r in caplog.records)


def test_a_failed_conversion_falls_back_to_torch_once(small_model, tmp_path, monkeypatch, caplog):
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("cannot convert (test)")

    monkeypatch.setattr(openvino, "convert_model", broken)
    encoder = OpenVINOEncoder(small_model.backbone, "fp32", tmp_path)
    img = torch.randn(1, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="interformer.encode_engine"):
        for _ in range(2):
            got = encoder(img)
            with torch.no_grad():
                assert all(torch.equal(w, g) for w, g in zip(small_model.backbone(img), got))
    assert len(calls) == 1
    assert len([r for r in caplog.records if "cannot convert (test)" in r.getMessage()]) == 1


def test_bad_batches_are_refused(f32_encoder):
    for bad in (torch.zeros(3, 64, 64), torch.zeros(1, 4, 64, 64)):
        with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
            f32_encoder(bad)


def test_predictor_encodes_on_the_engine_asked_for(small_model, f32_encoder):
    predictor = Predictor(small_model, device="cpu", encode_engine="openvino",
                          engine=ClickEngineConfig(cache_dir=str(f32_encoder.cache_dir)))
    assert predictor.encoder.name == "openvino-f32"
    image = np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    reference = Predictor(small_model, device="cpu").encode(image)
    feats = predictor.encode(image)
    assert max(_rel_rms(w, g) for w, g in zip(reference.pyramid, feats.pyramid)) < 1e-5
    predictor.encode_precision = "bf16"  # a changed setting rebuilds the encoder
    assert predictor.encoder.name == ("openvino-bf16" if runtime.native_bf16() else "openvino-f32")
    with pytest.raises(ValueError, match="encode engine"):
        Predictor(small_model, device="cpu", encode_engine="tensorrt")


class _FailingRequest:
    """An infer request whose runs fail the way OpenVINO's do when memory runs out at a huge size (a
    RuntimeError from infer()); everything else is the real request's. Counts the runs it was asked for."""

    def __init__(self, request, sizes: set[tuple[int, int]]) -> None:
        self.request, self.sizes, self.runs = request, sizes, []

    def infer(self, inputs):
        size = tuple(inputs[0].shape[2:])
        self.runs.append(size)
        if size in self.sizes:
            raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp: std::bad_alloc (test)")
        return self.request.infer(inputs)

    def get_output_tensor(self, i):
        return self.request.get_output_tensor(i)


def test_a_batch_the_runtime_fails_to_run_is_encoded_by_torch_and_its_size_stays_there(small_model, f32_encoder,
                                                                                       caplog):
    """A failure inside infer() (not at conversion) used to surface as the job's error: now torch encodes that
    batch, bit for bit the reference, and every later batch of that padded size; other sizes stay on the engine."""
    encoder = OpenVINOEncoder(small_model.backbone, "fp32", f32_encoder.cache_dir)  # reads the module's IR
    assert encoder.prepare()
    failing = _FailingRequest(encoder._request, {(96, 64)})
    encoder._request = failing
    big, other = torch.randn(2, 3, 96, 64), torch.randn(1, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="interformer.encode_engine"), torch.no_grad():
        for _ in range(2):
            got = encoder(big)
            assert all(torch.equal(w, g) for w, g in zip(small_model.backbone(big), got))
        reference = small_model.backbone(other)
        assert max(_rel_rms(w, g) for w, g in zip(reference, encoder(other))) < 1e-5
    assert failing.runs == [(96, 64), (64, 64)], "a failed size is not run again; other sizes are"
    assert len([r for r in caplog.records if "bad_alloc" in r.getMessage()]) == 1
