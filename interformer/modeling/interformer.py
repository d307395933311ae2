"""The InterFormer model: offline `backbone` (ViT + SimpleFPN) and per-click `neck` (I-MSA) + `decode_head`.

Submodule names (`backbone`, `neck`, `decode_head`, `auxiliary_head`) match the official
`ClickSegmentor`, so official state dicts load with strict key matching.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig, PreprocessConfig
from .fpn import MAEWithSimpleFPN
from .heads import ConvModule, FCNHead, UPerHead
from .imsa import IMSA, IMSACache, Roi

RANDOM_INIT = "random-init"


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
        """Identifies what produced stored features: variant, weights and preprocessing settings."""
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
