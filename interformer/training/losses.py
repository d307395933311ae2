"""Normalized focal loss (RITM / InterFormer `losses/focal_loss.py`) and the decode + auxiliary objective (spec §6).

The 2-class logits are reduced to one binary logit l1 - l0, so p = sigmoid(l1 - l0) = softmax(...)[1].
Per image: pt = 1 - |p - y| on valid pixels, beta = (1 - pt)^gamma rescaled so that it sums to the number of
valid pixels (the scale is detached), loss = sum(-alpha * beta * log(min(pt + eps, 1))) / #valid.
Pixels labelled `ignore_index` count nowhere; an image without valid pixels contributes 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cli_types import FRACTION, real

IGNORE_INDEX = 255
FLOAT_EPS = float(torch.finfo(torch.float32).eps)


def binary_logit(logits: torch.Tensor) -> torch.Tensor:
    """[B, 2, H, W] two-class logits (or [B, 1, H, W] / [B, H, W] binary logits) -> [B, H, W] logit of class 1."""
    if logits.dim() == 4 and logits.shape[1] == 2:
        return logits[:, 1] - logits[:, 0]
    if logits.dim() == 4 and logits.shape[1] == 1:
        return logits[:, 0]
    if logits.dim() == 3:
        return logits
    raise ValueError(f"expected logits of shape [B, 2, H, W], [B, 1, H, W] or [B, H, W], got {tuple(logits.shape)}")


def normalized_focal_loss(
    logits: torch.Tensor,
    label: torch.Tensor,
    alpha: float = 0.5,
    gamma: float = 2.0,
    eps: float = FLOAT_EPS,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-image NFL, shape [B]. `label` [B, H, W] (or [B, 1, H, W]) holds 0 / 1 / `ignore_index`, same H, W as logits."""
    if label.dim() == 4:
        if label.shape[1] != 1:
            raise ValueError(f"expected label [B, 1, H, W], got {tuple(label.shape)}")
        label = label[:, 0]
    x = binary_logit(logits)
    if x.shape != label.shape:
        raise ValueError(f"logits {tuple(x.shape)} and label {tuple(label.shape)} differ in batch or spatial size")
    valid = label != ignore_index
    weight = valid.to(x.dtype)
    target = (label == 1).to(x.dtype)
    p = torch.sigmoid(x)
    alpha_map = torch.where(label != 0, torch.full_like(p, alpha), torch.full_like(p, 1.0 - alpha)) * weight
    pt = torch.where(valid, 1.0 - (p - target).abs(), torch.ones_like(p))
    beta = (1.0 - pt) ** gamma
    n_valid = weight.sum(dim=(-2, -1))
    scale = (n_valid / (beta.sum(dim=(-2, -1)) + eps)).detach()
    beta = scale[:, None, None] * beta
    pixel_loss = -alpha_map * beta * torch.log((pt + eps).clamp(max=1.0)) * weight
    per_image = pixel_loss.sum(dim=(-2, -1)) / n_valid.clamp(min=1.0)
    return torch.where(n_valid > 0, per_image, torch.zeros_like(per_image))


@dataclass(frozen=True)
class LossConfig:
    """Weights of the two NFL terms (spec §6: decode head 1.0, auxiliary head 0.4)."""

    focal_alpha: float = field(default=0.5, metadata={"range": FRACTION,
        "help": "NFL alpha (weight of foreground pixels)"})
    focal_gamma: float = field(default=2.0, metadata={"range": real(0), "help": "NFL focusing exponent gamma"})
    decode_weight: float = field(default=1.0, metadata={"range": real(0), "help": "weight of the decode-head NFL"})
    aux_weight: float = field(default=0.4, metadata={"range": real(0),
        "help": "weight of the auxiliary-head NFL (0 disables it)"})


def segmentation_losses(
    logits: torch.Tensor, aux_logits: torch.Tensor | None, label: torch.Tensor, cfg: LossConfig = LossConfig()
) -> dict[str, torch.Tensor]:
    """mmseg-style losses: both heads' logits are bilinearly resized to the label size, each NFL is averaged
    over the batch; `loss` is their weighted sum (the optimised quantity)."""
    if label.dim() == 4:
        label = label[:, 0]
    size = label.shape[-2:]

    def nfl(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return normalized_focal_loss(x, label, cfg.focal_alpha, cfg.focal_gamma).mean()

    out = {"decode_loss": cfg.decode_weight * nfl(logits)}
    if aux_logits is not None and cfg.aux_weight > 0:
        out["aux_loss"] = cfg.aux_weight * nfl(aux_logits)
    out["loss"] = sum(out.values())
    return out
