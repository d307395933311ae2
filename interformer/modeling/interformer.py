"""The InterFormer model: offline `backbone` (ViT + SimpleFPN) and per-click `neck` (I-MSA) + `decode_head`.

Submodule names (`backbone`, `neck`, `decode_head`, `auxiliary_head`) match the official
`ClickSegmentor`, so official state dicts load with strict key matching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig, PreprocessConfig, ViTConfig
from .fpn import MAEWithSimpleFPN
from .heads import ConvModule, FCNHead, UPerHead
from .imsa import IMSA, IMSACache, Roi

RANDOM_INIT = "random-init"

# The version of the function from (image, weights, preprocessing settings) to the pyramid: bump it in the
# commit that changes what the encoder computes for some input (preprocessing, position tables, padding, ...)
# and add a FeatureChange saying at which geometries rows of the older versions differ. It is stored per row
# (not part of the fingerprint), so that only the affected rows are found stale and encoded again.
FEATURE_VERSION = 2

Grid = tuple[int, int]  # the ViT's patch grid (rows, columns) of a padded input


@dataclass(frozen=True)
class FeatureChange:
    """What one FEATURE_VERSION bump changed: `affects(grid, window)` is True for the patch grids (of the ViT's
    `window` x `window` training grid) at which features of the versions before `version` differ from it."""

    version: int
    summary: str
    affects: Callable[[Grid, int], bool]


def _non_square_training_token_count(grid: Grid, window: int) -> bool:
    return grid[0] != grid[1] and grid[0] * grid[1] == window * window


FEATURE_CHANGES: tuple[FeatureChange, ...] = (
    FeatureChange(2, "a non-square patch grid with the training grid's token count now reads the position "
                     "tables unresized, row-major, as the official model does (commit bfec509)",
                  _non_square_training_token_count),
)


def patch_grid(padded_size: tuple[int, int], vit: ViTConfig) -> Grid:
    """The ViT's patch grid for a padded input size (H, W)."""
    return (padded_size[0] // vit.patch_size, padded_size[1] // vit.patch_size)


def stale_reason(row_version: int | None, padded_size: tuple[int, int], vit: ViTConfig,
                 changes: tuple[FeatureChange, ...] = FEATURE_CHANGES) -> str | None:
    """Why a stored row of feature version `row_version` (None: stored before versions were recorded, i.e. 1)
    at this padded size differs from what this code computes, or None when it is current. Rows of a newer
    version than this code's are never called stale here: older code cannot judge them."""
    version = 1 if row_version is None else int(row_version)
    grid = patch_grid(padded_size, vit)
    for change in sorted(changes, key=lambda c: c.version):
        if version < change.version <= FEATURE_VERSION and change.affects(grid, vit.window):
            return (f"feature version {version} < {change.version} at {padded_size[1]}x{padded_size[0]} (WxH): "
                    f"{change.summary}")
    return None


class InterFormer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MAEWithSimpleFPN(config.vit)
        self.neck = IMSA(config.imsa)
        self.decode_head = UPerHead(config.head)
        self.auxiliary_head = FCNHead(config.head)
        self.checkpoint_id = RANDOM_INIT  # sha256 of the weights file once loaded (interformer.checkpoint)
        self.checkpoint_path: str | None = None

    def fingerprint(self, preprocess: PreprocessConfig) -> str:
        """Identifies what produced stored features: variant, weights and preprocessing settings. The encoder
        code's FEATURE_VERSION, engine and precision are recorded per row instead (pipeline.feature_store)."""
        return (f"{self.config.name}:{self.checkpoint_id[:16]}:max_side={preprocess.max_side}"
                f":div={preprocess.size_divisor}")

    def encode(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Normalised, padded images [B,3,H,W] (H, W multiples of 32) -> pyramid [P0..P3]."""
        return self.backbone(img)

    def precompute(self, pyramid: list[torch.Tensor]) -> IMSACache:
        """Click-independent I-MSA keys/values for one image's pyramid."""
        return self.neck.precompute(pyramid)

    def decode(self, pyramid: list[torch.Tensor], ref_label: torch.Tensor, roi: Roi | None = None,
               cache: IMSACache | None = None) -> torch.Tensor:
        """I-MSA + UPerHead: low-resolution 2-class logits [B, 2, H/4, W/4]."""
        return self.decode_head(self.neck(pyramid, ref_label, roi=roi, cache=cache))

    def forward_train(self, img: torch.Tensor, ref_label: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training forward with gradients: decode-head and auxiliary-head logits."""
        neck_out = self.neck(self.backbone(img), ref_label)
        return {"logits": self.decode_head(neck_out), "aux_logits": self.auxiliary_head(neck_out)}

    def forward(self, img: torch.Tensor, ref_label: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(img), ref_label)

    def fuse_for_inference(self) -> "InterFormer":
        """Fold BatchNorm into the head convolutions (eval only); `unfuse` undoes it before training."""
        self.eval()
        for m in self.modules():
            if isinstance(m, ConvModule):
                m.fuse_bn()
        return self

    def unfuse(self) -> "InterFormer":
        for m in self.modules():
            if isinstance(m, ConvModule):
                m.unfuse()
        return self
