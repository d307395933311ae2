"""How much memory the encoder's global attention needs for an image, and what to do when it is too much.

Every ViT layer attends globally over the N = (Hp/16)·(Wp/16) tokens of the padded image (plus the cls
token): it builds a [heads, 1+N, 1+N] fp32 relative-position bias and, per image, the scores q·kᵀ + bias and
their softmax (interformer/modeling/vit.py). These N² matrices dominate the encoder's peak memory: measured
with Light (torch fp32, CPU), the peak grows by 3.3 times one such matrix, 2.5 GiB at 1024², and a 6000x4000
photo (94 001 tokens) would need ~1.3 TiB. An image over the budget (`PreprocessConfig.max_encode_memory_gib`,
`--max-encode-memory`) is refused before any encoding with the `--max-side` that would make it fit.
"""
from __future__ import annotations

import math
from dataclasses import replace

from .config import PreprocessConfig, ViTConfig
from .preprocess import InvalidImageError, compute_geometry

GIB = 1 << 30
ATTENTION_MATRICES = 3.3  # peak memory / bytes of one [heads, 1+N, 1+N] fp32 matrix, per image (measured)


class ImageTooLargeError(InvalidImageError):
    """The image would need more attention memory than the encoder's budget; the message says what to do."""


def token_count(padded_size: tuple[int, int], patch_size: int) -> int:
    """Patch tokens of a padded (H, W) image, the cls token not counted."""
    return (padded_size[0] // patch_size) * (padded_size[1] // patch_size)


def attention_memory_bytes(padded_size: tuple[int, int], vit: ViTConfig, batch: int = 1) -> int:
    """Estimated peak bytes of the ViT's attention for `batch` images of one padded size."""
    n = 1 + token_count(padded_size, vit.patch_size)
    return int(math.ceil(ATTENTION_MATRICES * batch * vit.num_heads * n * n * 4))


def images_per_pass(padded_size: tuple[int, int], preprocess: PreprocessConfig, vit: ViTConfig) -> int:
    """How many images of this padded size one forward pass may hold within the budget (at least 1)."""
    budget = preprocess.max_encode_memory_gib * GIB
    return max(1, int(budget // attention_memory_bytes(padded_size, vit)))


def fitting_max_side(original_size: tuple[int, int], preprocess: PreprocessConfig, vit: ViTConfig) -> int | None:
    """The largest multiple of 32 that, as `max_side`, brings this image within the budget; None if none does.

    The token count only grows with max_side, so a binary search over the multiples of 32 finds it."""
    budget = preprocess.max_encode_memory_gib * GIB

    def fits(side: int) -> bool:
        geometry = compute_geometry(original_size, replace(preprocess, max_side=side))
        return attention_memory_bytes(geometry.padded_size, vit) <= budget

    lo, hi = 0, max(original_size) // 32  # fits(32 * lo) holds (lo > 0) or is unknown (lo == 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(32 * mid):
            lo = mid
        else:
            hi = mid - 1
    return 32 * lo if lo else None


def encode_memory_problem(original_size: tuple[int, int], preprocess: PreprocessConfig, vit: ViTConfig
                          ) -> str | None:
    """Why an image of `original_size` (H, W) cannot be encoded within the budget, or None when it can."""
    geometry = compute_geometry(original_size, preprocess)
    need = attention_memory_bytes(geometry.padded_size, vit)
    limit = preprocess.max_encode_memory_gib
    if need <= limit * GIB:
        return None
    side = fitting_max_side(original_size, preprocess, vit)
    advice = (f"use --max-side {side} (PreprocessConfig.max_side)" if side is not None else
              "no --max-side makes it fit")
    tokens = token_count(geometry.padded_size, vit.patch_size)
    return (f"{original_size[1]}x{original_size[0]} image: {tokens} tokens would need ~{need / GIB:.1f} GiB of "
            f"attention memory, over --max-encode-memory {limit:g} GiB; {advice}, or raise the limit")


def check_encode_memory(original_size: tuple[int, int], preprocess: PreprocessConfig, vit: ViTConfig) -> None:
    """Raise ImageTooLargeError when the image would need more attention memory than the budget."""
    problem = encode_memory_problem(original_size, preprocess, vit)
    if problem is not None:
        raise ImageTooLargeError(problem)

