"""Label Studio brush RLE for binary masks, through label-studio-sdk's own encoder.

Label Studio draws a brush region from an RGBA run-length code; a pixel is visible when its alpha is
255, so a mask must be encoded as uint8 0/255 (a 0/1 mask round-trips but is invisible, and the SDK
refuses bool arrays).
"""
from __future__ import annotations

import numpy as np
from label_studio_sdk.converter import brush


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encode a 2-D mask (bool, or numbers where non-zero means foreground) as Label Studio brush RLE."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError("mask is empty")
    alpha = np.where(mask != 0, np.uint8(255), np.uint8(0))
    return brush.mask2rle(alpha)


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE into a bool (H, W) mask (alpha channel > 127)."""
    flat = brush.decode_rle(rle)
    if flat.size != height * width * 4:
        raise ValueError(f"RLE holds {flat.size // 4} pixels, expected {height}x{width} = {height * width}")
    return flat.reshape(height, width, 4)[:, :, 3] > 127
