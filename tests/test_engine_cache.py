"""The converted-model cache both OpenVINO engines share (interformer.runtime): an IR is compiled only when its
files are exactly the ones saved, whatever byte of either file changed, and a damaged click network is converted
again and answers as before."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interformer import Predictor, runtime
from interformer.click_engine import ClickEngineConfig
from interformer.clicks import DEF_FG, UNKNOWN

openvino = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def saved_click_ir(small_model, tmp_path_factory):
    """A real converted click network (the small model at 64x64) as the engine saved it."""
    cache = tmp_path_factory.mktemp("click-cache")
    predictor = Predictor(small_model, device="cpu", engine=ClickEngineConfig("openvino-f32", cache_dir=str(cache)))
    feats = predictor.encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    predictor.predict_margin(feats, np.full(feats.geometry.padded_size, UNKNOWN, np.uint8), None)
    (xml,) = cache.rglob("*.xml")
    return xml


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from([".xml", ".bin"]), where=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
def test_any_changed_byte_of_a_saved_ir_is_refused(saved_click_ir, tmp_path_factory, which, where, flip):
    folder = tmp_path_factory.mktemp("copy")
    xml = folder / saved_click_ir.name
    for suffix in (".xml", ".bin", ".sha256"):
        shutil.copy(saved_click_ir.with_suffix(suffix), xml.with_suffix(suffix))
    core = openvino.Core()
    assert runtime.read_ir(core, xml) is not None  # the copy as saved reads
    target = xml.with_suffix(which)
    data = bytearray(target.read_bytes())
    data[int(where * len(data))] ^= flip
    target.write_bytes(data)
    with pytest.raises(runtime.DamagedIRError):
        runtime.read_ir(core, xml)


def test_an_ir_with_a_missing_file_is_refused(saved_click_ir, tmp_path):
    core = openvino.Core()
    for missing in (".bin", ".sha256"):
        xml = tmp_path / missing.strip(".") / saved_click_ir.name
        xml.parent.mkdir()
        for suffix in {".xml", ".bin", ".sha256"} - {missing}:
            shutil.copy(saved_click_ir.with_suffix(suffix), xml.with_suffix(suffix))
        with pytest.raises(runtime.DamagedIRError):
            runtime.read_ir(core, xml)


@pytest.mark.parametrize("damage", ["truncated weights", "no digest"])  # a changed byte: test_encode_engine
def test_a_damaged_click_network_is_converted_again_and_answers_as_before(small_model, saved_click_ir, tmp_path,
                                                                          caplog, damage):
    cache = shutil.copytree(saved_click_ir.parents[1], tmp_path / "cache")  # a whole entry for 64x64 images
    cfg = ClickEngineConfig("openvino-f32", cache_dir=str(cache))
    first = Predictor(small_model, device="cpu", engine=cfg)
    feats = first.encode(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ref = np.full(feats.geometry.padded_size, UNKNOWN, np.uint8)
    ref[30:40, 20:30] = DEF_FG
    want = first.predict_margin(feats, ref, None)
    (xml,) = cache.rglob("*.xml")
    weights = xml.with_suffix(".bin")
    data = bytearray(weights.read_bytes())
    if damage == "one weight byte changed":  # OpenVINO reads it without complaint: only the digest notices
        data[len(data) // 2] ^= 0x40
        weights.write_bytes(data)
    elif damage == "truncated weights":
        weights.write_bytes(data[: len(data) // 2])
    else:
        runtime.digest_path(xml).unlink()
    with caplog.at_level(logging.WARNING, logger="interformer.click_engine"):
        again = Predictor(small_model, device="cpu", engine=cfg)
        got = again.predict_margin(feats, ref, None)
    assert again.engine.name == "openvino-f32"
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    assert not any("fallback" in r.getMessage() for r in caplog.records)  # repaired, not handed to torch
    assert np.array_equal(got, want)
    assert runtime.read_ir(openvino.Core(), xml) is not None  # the entry is whole again


def test_a_cache_that_cannot_be_written_is_still_read(saved_click_ir, tmp_path):
    """A cache shared read-only between machines: no lock file can be made (here a folder stands where it would
    go, which stops root too), and a whole entry is read without converting."""
    xml = tmp_path / saved_click_ir.name
    for suffix in (".xml", ".bin", ".sha256"):
        shutil.copy(saved_click_ir.with_suffix(suffix), xml.with_suffix(suffix))
    xml.with_suffix(".lock").mkdir()

    def convert():
        raise AssertionError("converted a whole entry")

    model = runtime.read_or_convert(openvino.Core(), xml, convert, logging.getLogger("test"))
    assert len(model.inputs) == len(openvino.Core().read_model(str(saved_click_ir)).inputs)
