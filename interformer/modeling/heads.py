"""mmseg UPerHead (decode head) and FCNHead (auxiliary, training only), spec §5.

Every ConvModule is conv (no bias) + BatchNorm + ReLU, named `conv` / `bn` as in mmcv. For inference,
`fuse_bn` folds each BatchNorm into its conv (same function, fewer passes over memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HeadConfig, PYRAMID_CHANNELS


class ConvModule(nn.Module):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.fused: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight, bias), not a state-dict entry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and not self.training:
            return F.relu(F.conv2d(x, self.fused[0], self.fused[1], padding=self.conv.padding), inplace=True)
        return F.relu(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse_bn(self) -> None:
        """Fold the (eval-mode) BatchNorm into a conv with bias; used by inference only."""
        bn, conv = self.bn, self.conv
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.fused = (conv.weight * scale[:, None, None, None]).contiguous(), bn.bias - bn.running_mean * scale

    def unfuse(self) -> None:
        self.fused = None


def _up(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """PPM on the stride-32 level + FPN over the 4 I-MSA outputs -> 2-class logits at stride 4."""

    def __init__(self, cfg: HeadConfig, in_channels: tuple[int, ...] = PYRAMID_CHANNELS) -> None:
        super().__init__()
        ch = cfg.channels
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], ch, 1)) for s in cfg.pool_scales
        )
        self.bottleneck = ConvModule(in_channels[-1] + len(cfg.pool_scales) * ch, ch, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, ch, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(ch, ch, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * ch, ch, 3)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.conv_seg = nn.Conv2d(ch, cfg.num_classes, 1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [_up(m(x), x.shape[2:]) for m in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.features(inputs)))

    def features(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The fused FPN features at stride 4, before the classifier (`conv_seg`)."""
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _up(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_up(o, size) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))


class FCNHead(nn.Module):
    """Auxiliary head on I-MSA output 2 (stride 16): one 3x3 ConvModule and a 1x1 classifier."""

    def __init__(self, cfg: HeadConfig, in_channels: int = PYRAMID_CHANNELS[2]) -> None:
        super().__init__()
        self.in_index = cfg.aux_in_index
        self.convs = nn.Sequential(ConvModule(in_channels, cfg.aux_channels, 3))
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.conv_seg = nn.Conv2d(cfg.aux_channels, cfg.num_classes, 1)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(inputs[self.in_index])))
