"""The model layer refuses input it cannot take with a clear error (never a deep traceback or a NaN mask):
preprocessing settings, zoom-in boxes, image geometries, non-finite features and margins, object-less
evaluation samples."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interformer import PreprocessConfig, Predictor, load_model
from interformer.features import ImageFeatures, ImageGeometry, pyramid_shapes
from interformer.predictor import InvalidClickError, NonFiniteOutputError, check_box
from interformer.preprocess import compute_geometry
from pipeline.datasets import Sample, SampleRef
from pipeline.evaluation import EvalConfig, evaluate_sample

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- 1. PreprocessConfig --------------------------------------------------------------------------------------

@FAST
@given(st.integers(-100, 31))
def test_preprocess_config_refuses_max_side_below_32(max_side):
    with pytest.raises(ValueError, match="max_side"):
        PreprocessConfig(max_side=max_side)


@FAST
@given(st.integers(-64, 512).filter(lambda d: d <= 0 or d % 32))
def test_preprocess_config_refuses_size_divisor_not_a_positive_multiple_of_32(divisor):
    with pytest.raises(ValueError, match="size_divisor"):
        PreprocessConfig(size_divisor=divisor)


@pytest.mark.parametrize("max_pixels", [0, -1, 1.5, True])
def test_preprocess_config_refuses_max_pixels_below_one(max_pixels):
    with pytest.raises(ValueError, match="max_pixels"):
        PreprocessConfig(max_pixels=max_pixels)


@FAST
@given(st.one_of(st.none(), st.integers(32, 4096)), st.integers(1, 8), st.integers(1, 3000), st.integers(1, 3000))
def test_valid_preprocess_configs_give_geometries_that_hold_the_image(max_side, k, h, w):
    cfg = PreprocessConfig(max_side=max_side, size_divisor=32 * k)
    geo = compute_geometry((h, w), cfg)
    assert geo.padded_size[0] % (32 * k) == 0 and geo.padded_size[1] % (32 * k) == 0
    assert all(1 <= r <= p for r, p in zip(geo.resized_size, geo.padded_size))


# --- 2. zoom-in boxes ---------------------------------------------------------------------------------------

H, W = 64, 96
_coord = st.one_of(st.floats(-200, 300, allow_nan=False), st.integers(-200, 300),
                   st.sampled_from([math.nan, math.inf, -math.inf]))


def _box_ok(box) -> bool:
    left, up, right, bottom = box
    return all(math.isfinite(v) for v in box) and 0 <= left < right <= W and 0 <= up < bottom <= H


@FAST
@given(st.tuples(_coord, _coord, _coord, _coord))
def test_check_box_accepts_exactly_the_non_empty_boxes_inside_the_image(box):
    if _box_ok(box):
        check_box(box, (H, W))
    else:
        with pytest.raises(InvalidClickError, match="box"):
            check_box(box, (H, W))


@pytest.fixture(scope="module")
def refine_predictor():
    torch.manual_seed(0)
    return Predictor(load_model(None, variant="small_refine", device="cpu"), device="cpu")


@pytest.fixture(scope="module")
def refine_feats(refine_predictor):
    return refine_predictor.encode(_image(H, W))


@pytest.mark.parametrize("box", [(10, 10, 10, 10), (200, 200, 300, 300), (-50, -50, -10, -10), (30, 20, 10, 5),
                                 (0, 0, 97, 64), (0, 0, math.nan, 10)])
def test_session_refuses_empty_inverted_or_outside_boxes(refine_predictor, refine_feats, box):
    with pytest.raises(InvalidClickError, match="box"):
        refine_predictor.session(refine_feats, box=box)


@pytest.mark.parametrize("box", [(0, 0, 96, 64), (0, 0, 1, 1), (95, 63, 96, 64)])
def test_session_with_a_valid_box_clicks_to_a_finite_margin(refine_predictor, refine_feats, box):
    result = refine_predictor.session(refine_feats, box=box).add_click(5, 5, True)
    assert np.isfinite(result.margin).all()


# --- 3. ImageGeometry ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("orig, resized, padded, scale", [
    ((64, 64), (64, 64), (32, 32), 1.0),      # canvas smaller than the image
    ((40, 40), (40, 40), (40, 40), 1.0),      # not a multiple of 32
    ((1, 1), (1, 1), (0, 0), 1.0),            # zero canvas
    ((0, 5), (0, 5), (32, 32), 1.0),          # empty image
    ((64, 64), (32, 32), (32, 32), 0.0),      # zero scale
    ((64, 64), (32, 32), (32, 32), math.nan),
    ((64, 64), (32, 32), (32, 32), math.inf),
])
def test_image_geometry_refuses_impossible_sizes(orig, resized, padded, scale):
    with pytest.raises(ValueError, match="ImageGeometry"):
        ImageGeometry(orig, resized, padded, scale)


@FAST
@given(st.integers(1, 200), st.integers(1, 200), st.integers(-64, 256), st.integers(-64, 256))
def test_image_geometry_accepts_exactly_canvases_that_hold_the_image(h, w, hp, wp):
    ok = h <= hp and w <= wp and hp % 32 == 0 and wp % 32 == 0
    if ok:
        assert ImageGeometry((h, w), (h, w), (hp, wp)).padded_size == (hp, wp)
    else:
        with pytest.raises(ValueError, match="ImageGeometry"):
            ImageGeometry((h, w), (h, w), (hp, wp))


# --- 4. non-finite features and margins ---------------------------------------------------------------------

def _features(fill: float, where: int = 0) -> ImageFeatures:
    geo = ImageGeometry((32, 32), (32, 32), (32, 32))
    levels = [torch.rand(1, *s) for s in pyramid_shapes(geo.padded_size)]
    levels[where].view(-1)[0] = fill
    return ImageFeatures(tuple(levels), geo)


@FAST
@given(st.sampled_from(["float32", "float16", "bfloat16", "int8", "int8sqrt"]),
       st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(0, 3))
def test_to_flat_refuses_non_finite_features(dtype, bad, level):
    with pytest.raises(ValueError, match=f"level {level}"):
        _features(bad, level).to_flat(dtype)


@FAST
@given(st.floats(65520.0, 1e30), st.booleans())
def test_to_flat_float16_refuses_values_beyond_its_range(value, negative):
    with pytest.raises(ValueError, match="float16"):
        _features(-value if negative else value).to_flat("float16")


def test_to_flat_keeps_large_values_where_the_dtype_holds_them():
    for dtype in ("float32", "bfloat16", "int8", "int8sqrt"):
        flat, shapes = _features(1e5).to_flat(dtype)
        back = ImageFeatures.from_flat(flat, shapes, _features(0).geometry, dtype=dtype)
        assert all(torch.isfinite(p).all() for p in back.pyramid)


def test_encode_refuses_non_finite_features_from_damaged_weights():
    torch.manual_seed(0)
    model = load_model(None, variant="small", device="cpu")
    with torch.no_grad():
        next(model.backbone.parameters()).fill_(math.nan)
    with pytest.raises(NonFiniteOutputError, match="encoder produced non-finite features"):
        Predictor(model, device="cpu").encode(_image(32, 32))


def test_a_click_on_non_finite_features_is_refused_not_an_empty_mask(small_model):
    predictor = Predictor(small_model, device="cpu")
    feats = _features(math.nan)
    with pytest.raises(NonFiniteOutputError, match="non-finite margin"):
        predictor.session(feats).add_click(3, 3, True)


# --- 5. evaluation samples without an object ----------------------------------------------------------------

class _NeverCalled:
    def start(self, image, image_id=None):
        raise AssertionError("an object-less sample must be refused before the segmenter runs")


@pytest.mark.parametrize("protocol", ["ritm", "interformer"])
@pytest.mark.parametrize("fill", [0, -1])
def test_evaluate_sample_refuses_samples_without_an_object_pixel(protocol, fill):
    ref = SampleRef("ds", "sample-7", "img", "/nonexistent", "binary")
    gt = np.full((20, 30), fill, np.int8)
    gt[0, :3] = 0  # background, ignore, never object
    with pytest.raises(ValueError, match="sample-7.*no object pixel"):
        evaluate_sample(_NeverCalled(), Sample(ref, _image(20, 30), gt), EvalConfig(protocol=protocol))
