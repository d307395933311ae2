"""Normalized focal loss against hand-computed values (spec §6)."""
from __future__ import annotations

import math

import pytest
import torch

from interformer.training.losses import LossConfig, normalized_focal_loss, segmentation_losses


def two_class(margins: list[list[float]]) -> torch.Tensor:
    """[1, 2, H, W] logits whose class-1 minus class-0 margin is `margins`."""
    m = torch.tensor(margins, dtype=torch.float32)
    return torch.stack([torch.zeros_like(m), m])[None]


def test_nfl_matches_hand_computation():
    # pixels: (margin 0, label 1), (margin ln 3, label 0), (margin 5, label 255 = ignore)
    logits = two_class([[0.0, math.log(3.0), 5.0]])
    label = torch.tensor([[[1, 0, 255]]])
    # p = 0.5 and 0.75 -> pt = 0.5 and 0.25; beta = 0.25 and 0.5625; scale = 2 / 0.8125
    scale = 2 / 0.8125
    expected = (0.5 * 0.25 * scale * -math.log(0.5) + 0.5 * 0.5625 * scale * -math.log(0.25)) / 2
    got = normalized_focal_loss(logits, label)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.586509, abs=1e-5)


def test_alpha_weights_foreground_and_background():
    logits = two_class([[0.0, 0.0]])
    label = torch.tensor([[[1, 0]]])
    # pt = 0.5 everywhere, beta normalised to 1: loss = (alpha + (1 - alpha)) * ln 2 / 2
    for alpha in (0.5, 0.25, 0.9):
        got = normalized_focal_loss(logits, label, alpha=alpha).item()
        assert got == pytest.approx(math.log(2) / 2, rel=1e-5)
    label_fg = torch.tensor([[[1, 1]]])
    assert normalized_focal_loss(logits, label_fg, alpha=0.25).item() == pytest.approx(0.25 * math.log(2), rel=1e-5)


def test_scale_is_detached_in_the_gradient():
    margins = torch.tensor([[0.3, -1.2, 2.0]], requires_grad=True)
    label = torch.tensor([[[1, 0, 0]]])
    loss = normalized_focal_loss(torch.stack([torch.zeros_like(margins), margins])[None], label)
    loss.sum().backward()
    # the same loss with the normaliser frozen as a constant
    x = margins.detach().clone().requires_grad_(True)
    p = torch.sigmoid(x)
    y = torch.tensor([[1.0, 0.0, 0.0]])
    pt = 1 - (p - y).abs()
    beta = (1 - pt) ** 2
    const = float(3 / beta.sum().detach())
    ref = (-0.5 * const * beta * torch.log(pt)).sum() / 3
    ref.backward()
    assert torch.allclose(margins.grad, x.grad, atol=1e-6)


def test_ignored_image_gives_zero_and_batch_mean():
    logits = torch.cat([two_class([[0.0, 1.0]]), two_class([[2.0, -2.0]])])
    label = torch.tensor([[[255, 255]], [[1, 0]]])
    per_image = normalized_focal_loss(logits, label)
    assert per_image[0].item() == 0.0
    assert per_image[1].item() > 0
    losses = segmentation_losses(logits, None, label, LossConfig())
    assert losses["loss"].item() == pytest.approx(per_image.mean().item(), rel=1e-6)


def test_confident_correct_prediction_has_tiny_loss_and_clipped_log():
    logits = two_class([[30.0, -30.0]])
    label = torch.tensor([[[1, 0]]])
    assert normalized_focal_loss(logits, label).item() < 1e-6


def test_aux_weight_and_upsampling_to_label_size():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 4)
    aux = torch.randn(2, 2, 2, 2)
    label = torch.randint(0, 2, (2, 16, 16))
    out = segmentation_losses(logits, aux, label, LossConfig(aux_weight=0.4))
    up = torch.nn.functional.interpolate(aux, size=(16, 16), mode="bilinear", align_corners=False)
    assert out["aux_loss"].item() == pytest.approx(0.4 * normalized_focal_loss(up, label).mean().item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["decode_loss"].item() + out["aux_loss"].item(), rel=1e-6)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="differ"):
        normalized_focal_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 5, 5, dtype=torch.long))
