"""Training click simulation: the k distribution, first-click placement, the sfc_inner_k rule, the model loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interformer.clicks import DEF_BG, DEF_FG, MAYBE_BG, MAYBE_FG, UNKNOWN
from interformer.training.click_sampler import (ClickSimConfig, border_distance, choose_click, first_click,
                                                num_clicks_distribution, sample_num_clicks)
from interformer.training.step import predict_masks, simulate_ref_labels


def test_k_distribution_is_geometric_0_6():
    probs = num_clicks_distribution(20, 0.6)
    assert len(probs) == 21
    z = (1 - 0.6 ** 21) / (1 - 0.6)
    assert probs[0] == pytest.approx(1 / z)
    assert probs[0] == pytest.approx(0.4, abs=1e-4) and probs[1] == pytest.approx(0.24, abs=1e-4)
    assert probs[2] == pytest.approx(0.144, abs=1e-4)
    assert np.allclose(probs[1:] / probs[:-1], 0.6)
    rng = np.random.default_rng(0)
    draws = np.array([sample_num_clicks(rng, 20, 0.6) for _ in range(20_000)])
    assert draws.min() >= 0 and draws.max() <= 20
    freq = np.bincount(draws, minlength=21) / len(draws)
    # binomial standard error at n = 20000 is < 0.0035; allow 4 sigma
    assert np.all(np.abs(freq[:5] - probs[:5]) < 0.014)
    assert draws.mean() == pytest.approx(float((np.arange(21) * probs).sum()), abs=0.05)
    assert (np.arange(21) * probs).sum() == pytest.approx(1.5, abs=0.01)


def test_first_click_is_a_most_interior_pixel():
    gt = np.zeros((40, 40), dtype=bool)
    gt[10:21, 5:26] = True  # 11 rows x 21 cols: distance 6 on row 15, cols 10..20
    dist = border_distance(gt)
    assert dist.max() == pytest.approx(6.0)
    seen = set()
    for seed in range(200):
        c = first_click(gt, np.random.default_rng(seed))
        assert c.positive
        assert c.row == 15 and 10 <= c.col <= 20, c
        seen.add(c.col)
    assert len(seen) >= 8  # uniform among the equidistant maxima, not a fixed argmax


def test_image_border_counts_as_boundary():
    gt = np.zeros((30, 30), dtype=bool)
    gt[:10, :] = True  # touches the top, left and right borders
    rows = {first_click(gt, np.random.default_rng(s)).row for s in range(100)}
    assert rows <= {4, 5}


def test_empty_object_has_no_first_click():
    assert first_click(np.zeros((8, 8), dtype=bool), np.random.default_rng(0)) is None


def test_sfc_inner_k_widens_the_click_area():
    gt = np.zeros((60, 60), dtype=bool)
    gt[5:55, 5:55] = True
    pred = np.zeros_like(gt)
    dist = border_distance(gt)
    dmax = dist.max()
    clicks = [choose_click(pred, gt, np.random.default_rng(s), sfc_inner_k=1.7) for s in range(300)]
    d = np.array([dist[c.row, c.col] for c in clicks])
    assert np.all(d > dmax / 1.7)
    assert (d < dmax).mean() > 0.9  # most are not at the maximum


def test_larger_error_region_decides_the_sign_and_ties_go_negative():
    gt = np.zeros((50, 50), dtype=bool)
    gt[0:20, 0:20] = True
    pred = np.zeros_like(gt)
    pred[30:50, 30:50] = True  # a false positive of the same size as the false negative
    c = choose_click(pred, gt, np.random.default_rng(0))
    assert not c.positive and 30 <= c.row < 50
    pred[30:50, 30:50] = False
    pred[40:44, 40:44] = True  # small FP: the FN wins
    c = choose_click(pred, gt, np.random.default_rng(0))
    assert c.positive and c.row < 20 and c.col < 20
    assert choose_click(gt.copy(), gt, np.random.default_rng(0)) is None


def test_clicked_pixels_are_excluded():
    gt = np.zeros((9, 9), dtype=bool)
    gt[4, 4] = True
    assert choose_click(np.zeros_like(gt), gt, np.random.default_rng(0), clicked=[(4, 4)]) is None


def test_simulated_ref_labels_follow_the_update_order():
    gt = np.zeros((1, 64, 64), dtype=bool)
    gt[0, 10:40, 10:40] = True
    calls = []

    def predict(ref):
        calls.append(ref.copy())
        pred = np.zeros(ref.shape, dtype=bool)
        pred[:, 10:40, 10:25] = True  # the left half of the object
        return pred

    cfg = ClickSimConfig()
    ref, n = simulate_ref_labels(gt, 2, predict, np.random.default_rng(0), cfg)
    assert n == [3]
    first = calls[0][0]
    # the first forward sees one positive disk on a field of UNKNOWN
    assert set(np.unique(first)) == {UNKNOWN, DEF_FG}
    assert (first == DEF_FG).sum() == 81
    # the second forward sees the prediction folded in and a second (positive) disk in the missed half
    second = calls[1][0]
    assert (second == DEF_FG).sum() > 81
    assert MAYBE_BG in second and MAYBE_FG in second
    assert ref.dtype == np.uint8 and set(np.unique(ref)) <= {DEF_BG, MAYBE_BG, UNKNOWN, MAYBE_FG, DEF_FG}


def test_predict_masks_is_the_inference_sessions_mask(small_model):
    """The training loop's masks are the ones the interactive session gives for the same clicks.

    The session takes another route to the same function (cached I-MSA keys/values, a gathered click
    embedding, BatchNorm folded, the upsampled margin thresholded instead of a 2-channel argmax), so the
    masks may differ only where the margin is at fp32 noise level. The class bias is centred on the median
    first-click margin so that the masks are neither empty nor full (a random model answers background).
    """
    import copy

    from interformer.clicks import add_click_disk, initial_ref_label
    from interformer.predictor import Predictor

    model = copy.deepcopy(small_model).eval()
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    probe = Predictor(copy.deepcopy(model), device="cpu")
    margin = probe.session(probe.encode(image)).add_click(20, 20, True).margin
    with torch.no_grad():
        model.decode_head.conv_seg.bias[1] -= float(np.median(margin))
    predictor = Predictor(copy.deepcopy(model), device="cpu")
    feats = predictor.encode(image)
    clicks = [(20, 20, True), (40, 44, True)]
    ref = np.stack([add_click_disk(initial_ref_label((64, 64)), r, c, pos) for r, c, pos in clicks])
    with torch.no_grad():
        pyramid = [p.repeat(len(clicks), 1, 1, 1) for p in feats.pyramid]
        pred = predict_masks(model, pyramid, ref)
    assert pred.shape == (2, 64, 64) and pred.dtype == bool
    for b, (r, c, pos) in enumerate(clicks):
        result = predictor.session(feats).add_click(r, c, pos)
        assert 0 < result.mask.sum() < result.mask.size
        differ = pred[b] != result.mask
        assert np.all(np.abs(result.margin[differ]) < 1e-4), int(differ.sum())
    assert (pred[0] != pred[1]).any()  # each sample's own clicks decide its mask
