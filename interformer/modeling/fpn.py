"""SimpleFPN (spec §3) and the offline backbone = MAE ViT + SimpleFPN.

Every norm is GroupNorm(1, C): statistics over the whole map of each sample. Sequential indices match
the official `backbone.fpn.rescale_ops.{branch}.{index}` names.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import PYRAMID_CHANNELS, ViTConfig
from .vit import MAEViT


def _gn(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(1, ch)


class SimpleFPN(nn.Module):
    """Four maps at strides 4/8/16/32 with 32/64/128/256 channels from the stride-16 ViT map."""

    def __init__(self, dim: int, out_dims: tuple[int, ...] = PYRAMID_CHANNELS) -> None:
        super().__init__()
        half, quarter = dim // 2, dim // 4
        self.rescale_ops = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(dim, half, 2, 2), _gn(half), nn.GELU(),
                    nn.ConvTranspose2d(half, quarter, 2, 2), _gn(quarter),
                    nn.Conv2d(quarter, out_dims[0], 1), _gn(out_dims[0]), nn.GELU(),
                ),
                nn.Sequential(
                    nn.ConvTranspose2d(dim, half, 2, 2), _gn(half),
                    nn.Conv2d(half, out_dims[1], 1), _gn(out_dims[1]), nn.GELU(),
                ),
                nn.Sequential(nn.Conv2d(dim, out_dims[2], 1), _gn(out_dims[2]), nn.GELU()),
                nn.Sequential(
                    nn.Conv2d(dim, 2 * dim, 2, 2), _gn(2 * dim),
                    nn.Conv2d(2 * dim, out_dims[3], 1), _gn(out_dims[3]), nn.GELU(),
                ),
            ]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [op(x) for op in self.rescale_ops]


class MAEWithSimpleFPN(MAEViT):
    """The offline half of InterFormer: image [B,3,H,W] -> pyramid [P0..P3] (module name `backbone`)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__(cfg)
        self.fpn = SimpleFPN(cfg.embed_dim)

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return self.fpn(super().forward(img))
