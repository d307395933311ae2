"""The parts of InterFormer: ViT backbone, SimpleFPN, I-MSA neck, decode heads, and the assembled model."""
from .interformer import InterFormer

__all__ = ["InterFormer"]
