"""An image the encoder cannot take never stops the encode job, and is refused early with what to do.

The ViT's global attention needs memory quadratic in the token count (interformer/encode_memory.py): a 24 MP
photo under --max-pixels asked for 100+ GB and its RuntimeError failed the whole batch, then the job, with
nothing recorded, on every rerun. Here the budget is tiny (about 100 tokens of the small ViT) so that every
case is a few milliseconds, and the encoder is the real one wrapped by a deterministic fault injector: an
"allocator" that refuses any forward pass over the budget, and images marked by their top-left pixel that make
it raise, produce NaN or produce values float16 cannot store.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from interformer.config import PIXEL_MEAN, PIXEL_STD, PreprocessConfig, get_config
from interformer.encode_memory import (
    GIB,
    ImageTooLargeError,
    attention_memory_bytes,
    encode_memory_problem,
    fitting_max_side,
    images_per_pass,
    token_count,
)
from interformer.predictor import NonFiniteOutputError
from interformer.preprocess import InvalidImageError, compute_geometry
from pipeline.encoding import EncoderSpec, EncoderStage, build_predictor, decode_stage, write_stage
from pipeline.feature_store import FeatureStore
from pipeline.images import ENCODE_FAILED, REASONS, TOO_LARGE
from pipeline.staged_commits import StagedCommitter

SMALL = get_config("small").vit
TOKENS = 100  # the budget: a 160x160 image (10x10 tokens) fits, one more row or column of tokens does not
BUDGET_GIB = attention_memory_bytes((160, 160), SMALL) / GIB
PREPROCESS = PreprocessConfig(max_encode_memory_gib=BUDGET_GIB)
MARKS = {"raise": 7, "nan": 11, "overflow": 13}  # top-left pixel value of an image the fake encoder fails on
PLAIN = 128  # top-left pixel of every other image


def _tokens(h: int, w: int) -> int:
    return token_count(compute_geometry((h, w), PREPROCESS).padded_size, SMALL.patch_size)


def _image(h: int, w: int, seed: int, fault: str | None = None) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[0, 0] = MARKS[fault] if fault else PLAIN
    return img


def _fault_of(batch: torch.Tensor) -> list[str | None]:
    """The mark of each image of a normalised batch, read back from its top-left pixel."""
    red = batch[:, 0, 0, 0] * PIXEL_STD[0] + PIXEL_MEAN[0]
    names = {v: k for k, v in MARKS.items()}
    return [names.get(int(round(float(v)))) for v in red]


class FaultyEncoder:
    """Wraps a predictor's encode_pyramid: refuses passes over `budget` bytes of attention as torch's allocator
    does, and fails for the marked images of a pass. Records the batch size of every pass."""

    def __init__(self, encode_pyramid, budget: float, broken: bool = False):
        self.encode_pyramid, self.budget, self.broken = encode_pyramid, budget, broken
        self.passes: list[int] = []
        self.refused = 0

    def __call__(self, batch: torch.Tensor) -> list[torch.Tensor]:
        self.passes.append(batch.shape[0])
        if self.broken:
            raise RuntimeError("the model is broken (test)")
        need = attention_memory_bytes(tuple(batch.shape[-2:]), SMALL, batch.shape[0])
        if need > self.budget:
            self.refused += 1
            raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {need} bytes")
        faults = _fault_of(batch)
        if "raise" in faults:
            raise RuntimeError("injected failure (test)")
        if "nan" in faults:
            raise NonFiniteOutputError("the encoder produced non-finite features (test)")
        pyramid = self.encode_pyramid(batch)
        scale = torch.tensor([1e6 if f == "overflow" else 1.0 for f in faults])[:, None, None, None]
        return [p * scale for p in pyramid]  # 1e6: beyond float16's range, a ValueError when stored


@pytest.fixture(scope="module")
def stage() -> EncoderStage:
    spec = EncoderSpec(variant="small", preprocess=PREPROCESS, dtype="float16")
    stage = EncoderStage(spec, build_predictor(spec, device="cpu").fingerprint)
    stage.real_encode_pyramid = stage.predictor.encode_pyramid
    return stage


def _inject(stage: EncoderStage, **kwargs) -> FaultyEncoder:
    faulty = FaultyEncoder(stage.real_encode_pyramid, BUDGET_GIB * GIB, **kwargs)
    stage.predictor.encode_pyramid = faulty
    return faulty


def _write_images(folder: Path, images: list[np.ndarray]) -> pa.Table:
    ids = [f"img_{i}.png" for i in range(len(images))]
    for name, img in zip(ids, images):
        Image.fromarray(img).save(folder / name)
    return pa.table({"image_id": ids, "uri": [str(folder / n) for n in ids]})


# --- the whole class: decode -> encode -> write, one outcome per image -------------------------------------

@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(st.tuples(st.integers(1, 240), st.integers(1, 240),
                                st.sampled_from([None, None, None, "raise", "nan", "overflow"])),
                      min_size=1, max_size=4),
       same_size=st.booleans(), checked_in_decode=st.booleans())
def test_every_image_is_stored_or_recorded_and_the_others_are_stored(stage, specs, same_size, checked_in_decode):
    """Whatever the sizes and faults of a batch: each image is stored or has one error row with a reason.
    Over the budget: too_large from the decode stage with the --max-side that fits (or, when the decode stage
    does not check, encode_failed from the allocator's refusal); a faulty image: encode_failed; every other image
    is stored. Same-size images that fit alone but not together are encoded in smaller passes."""
    if same_size:
        specs = [(specs[0][0], specs[0][1], f) for _, _, f in specs]
    images = [_image(h, w, i, f) for i, (h, w, f) in enumerate(specs)]
    faulty = _inject(stage)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        batch = _write_images(folder, images)
        decoded = decode_stage(batch, PREPROCESS, SMALL if checked_in_decode else None)
        encoded = stage(decoded)
        store = FeatureStore(str(folder / "db"))
        committer = StagedCommitter(store)
        write_stage(encoded, store.features_uri, committer.uri, stage.fingerprint)
        committer.commit_staged()
        stored = store.existing_ids(stage.fingerprint)
        errors = store.errors(stage.fingerprint).to_pylist()

    ids = batch.column("image_id").to_pylist()
    assert sorted(encoded.column("image_id").to_pylist()) == sorted(ids)
    assert len(errors) == len({e["image_id"] for e in errors})
    assert stored.isdisjoint(e["image_id"] for e in errors) and stored | {e["image_id"] for e in errors} == set(ids)
    reasons = {e["image_id"]: e["reason"] for e in errors}
    for image_id, (h, w, fault) in zip(ids, specs):
        if _tokens(h, w) > TOKENS:
            want = TOO_LARGE if checked_in_decode else ENCODE_FAILED
        else:
            want = ENCODE_FAILED if fault else None
        assert reasons.get(image_id) == want, (image_id, h, w, fault, reasons)
    for e in errors:
        assert e["reason"] in REASONS and e["detail"]
        if e["reason"] == TOO_LARGE:
            assert "--max-side" in e["detail"] and "--max-encode-memory" in e["detail"]
    if checked_in_decode:  # no pass was over the budget: not one image alone, nor a group of them together
        assert faulty.refused == 0


def test_one_failing_image_of_a_group_leaves_the_others_stored(stage):
    """Three images of one padded size in one forward pass; the encoder raises on the middle one (as an
    allocation failure would): the pass fails, the images are encoded one by one, two are stored."""
    _inject(stage)
    with tempfile.TemporaryDirectory() as tmp:
        batch = _write_images(Path(tmp), [_image(64, 64, 0), _image(64, 64, 1, "raise"), _image(64, 64, 2)])
        out = stage(decode_stage(batch, PREPROCESS, SMALL))
    got = dict(zip(out.column("image_id").to_pylist(), out.column("reason").to_pylist()))
    assert got == {"img_0.png": None, "img_1.png": ENCODE_FAILED, "img_2.png": None}
    detail = out.filter(pa.compute.equal(out.column("image_id"), "img_1.png")).column("detail")[0].as_py()
    assert "RuntimeError: injected failure (test)" in detail
    assert all(f is not None for f in out.filter(pa.compute.is_null(out.column("reason"))).column("features"))


def test_an_encoder_that_fails_on_everything_stops_the_job_instead_of_recording_every_image(stage):
    """A broken model fails each image and the blank probe: the stage raises one clear RuntimeError rather than
    marking good images as bad (which later runs would skip)."""
    _inject(stage, broken=True)
    with tempfile.TemporaryDirectory() as tmp:
        batch = _write_images(Path(tmp), [_image(64, 64, 0), _image(32, 96, 1)])
        decoded = decode_stage(batch, PREPROCESS, SMALL)
    with pytest.raises(RuntimeError, match="the model or its runtime is broken, not the images"):
        stage(decoded)


def test_every_image_of_a_batch_bad_is_recorded_when_the_encoder_works(stage):
    _inject(stage)
    with tempfile.TemporaryDirectory() as tmp:
        batch = _write_images(Path(tmp), [_image(64, 64, 0, "nan"), _image(40, 40, 1, "overflow")])
        out = stage(decode_stage(batch, PREPROCESS, SMALL))
    assert out.column("reason").to_pylist() == [ENCODE_FAILED, ENCODE_FAILED]
    details = out.column("detail").to_pylist()
    assert "NonFiniteOutputError" in details[0] and "beyond float16's finite range" in details[1]


# --- the estimate and the advice ---------------------------------------------------------------------------

def test_the_estimate_matches_the_measured_peak_and_the_audit_photo():
    """Light at 1024²: 4097 tokens with cls, +2.46 GiB measured (the audit); 6000x4000: ~1.3 TiB."""
    light = get_config("light").vit
    assert attention_memory_bytes((1024, 1024), light) / GIB == pytest.approx(2.46, rel=0.02)
    problem = encode_memory_problem((4000, 6000), PreprocessConfig(), light)
    assert problem.startswith("6000x4000 image: 94000 tokens would need ~1303.5 GiB")
    assert "over --max-encode-memory 16 GiB; use --max-side 1952" in problem
    assert encode_memory_problem((1632, 1632), PreprocessConfig(), light) is None  # the documented sizes
    assert encode_memory_problem((1664, 1664), PreprocessConfig(), light) is not None
    assert encode_memory_problem((1080, 1920), PreprocessConfig(), light) is None
    assert encode_memory_problem((1504, 1504), PreprocessConfig(), get_config("tiny").vit) is None
    assert encode_memory_problem((1536, 1536), PreprocessConfig(), get_config("tiny").vit) is not None


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 9000), w=st.integers(1, 9000), budget=st.floats(1e-6, 64.0),
       variant=st.sampled_from(["light", "tiny", "small"]), max_side=st.sampled_from([None, 512, 4096]))
def test_the_advised_max_side_is_the_largest_multiple_of_32_that_fits(h, w, budget, variant, max_side):
    vit = get_config(variant).vit
    cfg = PreprocessConfig(max_side=max_side, max_encode_memory_gib=budget)

    def need(side: int | None) -> int:
        return attention_memory_bytes(compute_geometry((h, w), PreprocessConfig(max_side=side)).padded_size, vit)

    problem = encode_memory_problem((h, w), cfg, vit)
    assert (problem is None) == (need(max_side) <= budget * GIB)
    if problem is None:
        return
    side = fitting_max_side((h, w), cfg, vit)
    if side is None:
        assert need(32) > budget * GIB and "no --max-side makes it fit" in problem
    else:
        assert side % 32 == 0 and need(side) <= budget * GIB and f"--max-side {side} " in problem
        assert side + 32 > max(h, w) or need(side + 32) > budget * GIB
        assert encode_memory_problem((h, w), PreprocessConfig(max_side=side, max_encode_memory_gib=budget), vit) \
            is None


@pytest.mark.parametrize("budget", [0, -1.0, math.nan, math.inf, True, "8"])
def test_preprocess_config_refuses_a_budget_that_is_not_a_positive_number(budget):
    with pytest.raises(ValueError, match="max_encode_memory_gib"):
        PreprocessConfig(max_encode_memory_gib=budget)


# --- the API and the backend --------------------------------------------------------------------------------

def test_predictor_encode_refuses_an_image_over_the_budget_before_encoding(stage):
    predictor = build_predictor(EncoderSpec(variant="small", preprocess=PREPROCESS), device="cpu")
    calls = FaultyEncoder(predictor.encode_pyramid, BUDGET_GIB * GIB)
    predictor.encode_pyramid = calls
    with pytest.raises(ImageTooLargeError, match=r"^176x176 image: 144 tokens .* --max-side 160 .*raise the limit"
                       ) as e:
        predictor.encode_batch([_image(64, 64, 0), _image(176, 176, 1)])
    assert isinstance(e.value, InvalidImageError) and isinstance(e.value, ValueError) and calls.passes == []
    feats = predictor.encode_batch([_image(160, 160, i) for i in range(3)])  # one per pass: each fills the budget
    assert len(feats) == 3 and calls.passes == [1, 1, 1]
    assert images_per_pass((64, 64), PREPROCESS, SMALL) > 3
    predictor.encode_batch([_image(64, 64, i) for i in range(3)])
    assert calls.passes[3:] == [3]


def test_the_on_demand_encoder_answers_422_too_large_with_the_max_side(tmp_path):
    from connectors.engine import EngineConfig, OnDemandEncoder
    from connectors.segment import SegmentError
    from pipeline.image_access import ImageAccess

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_image(200, 300, 0)).save(images / "big.png")
    Image.fromarray(_image(96, 64, 1)).save(images / "small.png")
    encoder = OnDemandEncoder(EngineConfig(db=str(tmp_path / "db"), table="features", checkpoint=None,
                                           variant="small", preprocess=PREPROCESS, threads=1,
                                           access=ImageAccess(allowed_roots=(str(images.resolve()),))))
    with pytest.raises(SegmentError) as e:
        encoder.encode("big", str(images / "big.png"))
    side = fitting_max_side((200, 300), PREPROCESS, SMALL)
    assert e.value.status == 422 and "too_large" in e.value.message and f"--max-side {side} " in e.value.message
    assert "vit_ms" in encoder.encode("small", str(images / "small.png"))


def test_the_encode_job_option_reaches_the_encoder_spec(capsys):
    """--max-encode-memory is PreprocessConfig's budget, which the decode tasks, the encoder actors and the
    backend's EngineConfig all read; out of range it is a usage error (tests/test_cli_options.py: all of them)."""
    import jobs.encode

    cfg, _ = jobs.encode.parse_args(["samples", "--max-encode-memory", "2.5"])
    assert cfg.encoder.preprocess.max_encode_memory_gib == 2.5
    assert jobs.encode.parse_args(["samples"])[0].encoder.preprocess == PreprocessConfig()
    with pytest.raises(SystemExit) as e:
        jobs.encode.parse_args(["samples", "--max-encode-memory", "0"])
    assert e.value.code == 2 and "--max-encode-memory: must be a number > 0" in capsys.readouterr().err
