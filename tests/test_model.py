"""Unit tests of the model package: click encoding, features, preprocessing, sessions, checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from interformer import (CheckpointError, InvalidClickError, InvalidImageError, Predictor, PreprocessConfig,
                         load_model, save_checkpoint)
from interformer.checkpoint import checkpoint_filter_fn, detect_variant
from interformer.clicks import (DEF_BG, DEF_FG, MAYBE_BG, MAYBE_FG, UNKNOWN, add_click_disk, initial_ref_label,
                                update_by_prediction, zoom_in_roi)
from interformer.config import LIGHT, TINY
from interformer.features import ImageFeatures, ImageGeometry
from interformer.modeling import InterFormer
from interformer.preprocess import compute_geometry, preprocess


def test_click_disk_is_81_pixel_euclidean_disk_and_overwrites():
    ref = initial_ref_label((64, 64))
    pos = add_click_disk(ref, 30, 30, True)
    assert (pos == DEF_FG).sum() == 81
    assert pos[30, 35] == DEF_FG and pos[34, 33] == DEF_FG and pos[34, 34] == UNKNOWN
    neg = add_click_disk(pos, 30, 32, False)
    assert neg[30, 30] == DEF_BG and (neg == DEF_BG).sum() == 81
    assert (neg == DEF_FG).sum() == sum(1 for r in range(-5, 6) for c in range(-5, 6)
                                       if r * r + c * c <= 25 and r * r + (c - 2) ** 2 > 25)
    corner = add_click_disk(ref, 0, 0, True)
    assert (corner == DEF_FG).sum() == sum(1 for r in range(6) for c in range(6) if r * r + c * c <= 25)
    assert np.array_equal(ref, initial_ref_label((64, 64))), "inputs are never modified"


def test_update_by_prediction_moves_maybe_values_one_step():
    ref = np.array([[DEF_BG, MAYBE_BG, UNKNOWN, MAYBE_FG, DEF_FG]] * 2, dtype=np.uint8)
    pred = np.array([[1] * 5, [0] * 5], dtype=bool)
    out = update_by_prediction(ref, pred)
    assert out[0].tolist() == [0, 2, 3, 3, 4]
    assert out[1].tolist() == [0, 1, 1, 2, 4]


def test_zoom_in_roi_snaps_to_stride_and_covers_clicks():
    ref = add_click_disk(initial_ref_label((256, 320)), 100, 150, True)
    pred = np.zeros((256, 320), bool)
    pred[90:130, 140:200] = True
    roi = zoom_in_roi(pred, ref, 1.4, 32, 32)
    assert all(v % 32 == 0 for v in roi)
    left, up, right, bottom = roi
    assert left <= 140 and up <= 90 and right >= 200 and bottom >= 130
    assert zoom_in_roi(np.zeros((64, 96), bool), initial_ref_label((64, 96)), 1.4, 32, 32) == (0, 0, 96, 64)


def test_features_flat_round_trip():
    geo = ImageGeometry((50, 70), (50, 70), (64, 96))
    rng = np.random.default_rng(0)
    shapes = [(32, 16, 24), (64, 8, 12), (128, 4, 6), (256, 2, 3)]
    feats = ImageFeatures(tuple(torch.from_numpy(rng.standard_normal((1, *s)).astype(np.float32)) for s in shapes), geo)
    flat32, shp = feats.to_flat("float32")
    back = ImageFeatures.from_flat(flat32, shp, ImageGeometry.from_dict(geo.to_dict()))
    assert all(torch.equal(a, b) for a, b in zip(feats.pyramid, back.pyramid))
    flat16, _ = feats.to_flat("float16")
    assert flat16.dtype == np.float16 and feats.nbytes("float16") == flat16.nbytes
    back16 = ImageFeatures.from_flat(flat16, shp, geo)
    for a, b in zip(feats.pyramid, back16.pyramid):
        assert torch.equal(b, a.half().float())
    with pytest.raises(ValueError):
        ImageFeatures.from_flat(flat32[:-1], shp, geo)
    with pytest.raises(ValueError):
        ImageFeatures(feats.pyramid, ImageGeometry((50, 70), (50, 70), (96, 96)))


@pytest.mark.parametrize("bad", [
    np.zeros((10, 10, 4), np.uint8), np.zeros((0, 10, 3), np.uint8), np.zeros((10, 10, 3), np.float32),
    torch.zeros(10, 10, 3, dtype=torch.uint8), "image.png", np.zeros((2, 10, 10, 3), np.uint8),
])
def test_bad_images_raise_clear_errors(bad):
    with pytest.raises(InvalidImageError):
        preprocess(bad)


def test_preprocess_pads_after_normalisation_and_resizes_longest_side():
    img = np.full((30, 50, 3), 255, np.uint8)
    x, geo = preprocess(img)
    assert x.shape == (1, 3, 32, 64) and geo.padded_size == (32, 64)
    assert float(x[0, 0, 31, 63]) == 0.0 and float(x[0, 0, 0, 0]) > 2.0
    geo = compute_geometry((1000, 2000), PreprocessConfig(max_side=512))
    assert geo.resized_size == (256, 512) and geo.padded_size == (256, 512) and geo.scale == 0.256
    grey, _ = preprocess(np.zeros((40, 40), np.uint8))
    assert grey.shape == (1, 3, 64, 64)
    with pytest.raises(InvalidImageError):
        preprocess(np.zeros((100, 100, 3), np.uint8), PreprocessConfig(max_pixels=99))


@pytest.fixture(scope="module")
def predictor(small_model):
    return Predictor(small_model, device="cpu")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)


def test_session_clicks_undo_replay_and_objects(predictor, image):
    feats = predictor.encode(image)
    assert feats.geometry.padded_size == (96, 96)
    a = predictor.session(feats)
    r1 = a.add_click(30, 40, True)
    r2 = a.add_click(10, 10, False)
    assert r2.mask.shape == (70, 90) and r2.mask.dtype == bool and r2.padded_mask.shape == (96, 96)
    assert r2.prob.shape == (70, 90) and np.array_equal(r2.prob > 0.5, r2.mask)
    assert a.clicks == [(30, 40, True), (10, 10, False)]
    assert np.array_equal(a.undo().margin, r1.margin) and len(a.clicks) == 1
    b = predictor.session(feats)  # a second object on the same features
    replayed = b.replay([(30, 40, True), (10, 10, False)])
    a.add_click(10, 10, False)
    assert np.array_equal(replayed.margin, a.result.margin)
    assert np.array_equal(a.ref_label, b.ref_label)
    with pytest.raises(InvalidClickError):
        a.add_click(70, 5, True)
    with pytest.raises(InvalidClickError):
        a.add_click(-1, 5, True)


def test_encode_batch_equals_single_encode(predictor, image):
    other = np.random.default_rng(4).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    batch = predictor.encode_batch([image, other, image])
    single = predictor.encode(image)
    for a, b in zip(batch[0].pyramid, single.pyramid):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert batch[1].geometry.padded_size == (64, 64)


def test_resized_session_maps_masks_to_original_size(small_model):
    pred = Predictor(small_model, PreprocessConfig(max_side=64), device="cpu")
    img = np.random.default_rng(5).integers(0, 256, size=(100, 160, 3), dtype=np.uint8)
    feats = pred.encode(img)
    assert feats.geometry.resized_size == (40, 64) and feats.geometry.padded_size == (64, 64)
    res = pred.session(feats).add_click(99, 159, True)
    assert res.mask.shape == (100, 160)


def test_refine_stages_with_zoom_in_roi_run_and_full_roi_equals_none():
    torch.manual_seed(0)
    model = load_model(None, variant="small_refine")
    pyr = [torch.randn(1, c, 128 // s, 128 // s) for c, s in [(32, 4), (64, 8), (128, 16), (256, 32)]]
    ref = torch.full((1, 1, 128, 128), 2, dtype=torch.long)
    with torch.inference_mode():
        full = model.decode(pyr, ref, roi=None)
        whole = model.decode(pyr, ref, roi=(0, 0, 128, 128))
        part = model.decode(pyr, ref, roi=(32, 0, 96, 64))
    torch.testing.assert_close(full, whole)
    assert not torch.allclose(full, part)
    pred = Predictor(model, device="cpu")
    session = pred.session(pred.encode(np.random.default_rng(1).integers(0, 256, (100, 120, 3), dtype=np.uint8)))
    for k in range(4):
        session.add_click(20 + 10 * k, 30 + 5 * k, k != 2)
    assert len(session.clicks) == 4


def test_official_key_and_shape_lists_match_our_modules(shared_dir):
    for cfg, name in ((LIGHT, "state_dict_light.json"), (TINY, "state_dict_tiny.json")):
        official = json.loads((shared_dir / "fixtures" / "official_interformer" / name).read_text())["state_dict"]
        with torch.device("meta"):
            model = InterFormer(cfg)
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert ours == {k: shape for k, shape, _ in official}
        meta_sd = {k: torch.empty(shape, device="meta") for k, shape, _ in official}
        assert detect_variant(meta_sd) == cfg.name


def test_checkpoint_round_trip_and_errors(tmp_path, small_model):
    path = tmp_path / "small.pth"
    save_checkpoint(small_model, path, meta={"iter": 3})
    loaded = load_model(path)
    assert loaded.config.name == "small" and loaded.checkpoint_id != "random-init"
    for (k, a), b in zip(small_model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    bare = tmp_path / "bare.pth"
    torch.save(small_model.state_dict(), bare)
    assert load_model(bare).config.name == "small"
    with pytest.raises(CheckpointError, match="not InterFormer-light"):
        load_model(path, variant="light")
    refine = tmp_path / "refine.pth"
    save_checkpoint(InterFormer(load_model(None, "small_refine").config), refine)
    with pytest.raises(CheckpointError, match="small_refine, not InterFormer-small"):
        load_model(refine, variant="small")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pth")
    sd = dict(small_model.state_dict())
    sd.pop("neck.patch_embed")
    sd["neck.extra"] = torch.zeros(1)
    sd["decode_head.conv_seg.bias"] = torch.zeros(3)
    broken = tmp_path / "broken.pth"
    torch.save({"state_dict": sd, "meta": {}}, broken)
    with pytest.raises(CheckpointError) as err:
        load_model(broken)
    text = str(err.value)
    assert "missing" in text and "neck.patch_embed" in text and "neck.extra" in text and "conv_seg.bias" in text


def test_mae_timm_style_weights_map_onto_backbone(small_model):
    sd = small_model.state_dict()
    foreign = {}
    for k, v in sd.items():
        if not k.startswith("backbone.") or k.startswith("backbone.fpn") or "relative_position" in k:
            continue
        name = k[len("backbone."):].replace(".ffn.layers.0.0.", ".mlp.fc1.").replace(".ffn.layers.1.", ".mlp.fc2.")
        name = name.replace("layers.", "blocks.").replace(".ln1.", ".norm1.").replace(".ln2.", ".norm2.")
        name = name.replace("patch_embed.projection", "patch_embed.proj")
        if name.endswith("attn.qkv.bias"):
            c = v.shape[0] // 3
            foreign[name.replace("qkv.bias", "q_bias")] = v[:c]
            foreign[name.replace("qkv.bias", "v_bias")] = v[2 * c:]
            continue
        foreign[name] = v
    foreign["head.weight"] = torch.zeros(10, 96)
    mapped = checkpoint_filter_fn(foreign)
    for k, v in mapped.items():
        if k.endswith("qkv.bias"):
            c = v.shape[0] // 3
            assert torch.equal(v[:c], sd[k][:c]) and torch.equal(v[2 * c:], sd[k][2 * c:])
            assert torch.count_nonzero(v[c:2 * c]) == 0
        else:
            assert torch.equal(v, sd[k]), k
    assert "backbone.head.weight" not in mapped
