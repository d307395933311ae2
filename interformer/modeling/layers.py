"""Small shared layers."""
from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample during training (identity in eval)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def linear_rates(max_rate: float, n: int) -> list[float]:
    """n stochastic-depth rates rising linearly from 0 to max_rate (as torch.linspace)."""
    return [max_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
