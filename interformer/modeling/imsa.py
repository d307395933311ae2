"""I-MSA: the per-click interaction module (spec §4.1-§4.4).

A click-aware query stream starts at stride 4 (P0 + reference-label embedding), goes down to stride 32
through PatchMerging, and in each stage cross-attends once to that level's image features with P2T-style
pooling attention. The keys/values of those cross-attentions depend only on the image, so
`IMSA.precompute` builds them once per image (offline) and `forward` reuses them for every click.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IMSAConfig
from .layers import DropPath, linear_rates

Roi = tuple[int, int, int, int]  # (left, up, right, bottom) in pixels of the padded input, exclusive ends


def pooled_size(size: int, target: int, ratio: int) -> int:
    """Official pooled size along one axis: round(size / round(size / min(target/ratio, size))).

    Python's round is half-to-even, as in the official code.
    """
    hp = min(target / ratio, size)
    return int(round(size / round(size / hp)))


def group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    return F.group_norm(x, 1, norm.weight, norm.bias, norm.eps)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, C]; a free view when x is channels-last in memory."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def from_tokens(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, C] -> [B, C, h, w] stored channels-last (a view, no copy)."""
    return t.view(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


def linear_1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution as a matrix product over channels-last tokens."""
    h, w = x.shape[-2:]
    return from_tokens(F.linear(to_tokens(x), conv.weight.flatten(1), conv.bias), h, w)


class PoolingAttention(nn.Module):
    """Multi-head attention whose keys/values are max-pooled pyramids of the key map (4 ratios)."""

    def __init__(self, dim: int, num_heads: int, pool_ratios: tuple[int, ...], target: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.pool_ratios = pool_ratios
        self.target = target
        self.query_proj = nn.Linear(dim, dim)
        self.key_value_proj = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dconvs = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in pool_ratios)

    def pooled_tokens(self, kv: torch.Tensor) -> torch.Tensor:
        """[B, E, h, w] (already normalised) -> [B, L, E] pooled key/value tokens after LayerNorm.

        The pooled sizes come from Python ints, so a traced graph (click_engine) bakes them in as constants."""
        h, w = int(kv.shape[-2]), int(kv.shape[-1])
        parts = []
        for ratio, dconv in zip(self.pool_ratios, self.dconvs):
            size = (pooled_size(h, self.target, ratio), pooled_size(w, self.target, ratio))
            pooled = kv if ratio == 1 or size == (h, w) else F.adaptive_max_pool2d(kv, size)
            pooled = pooled + dconv(pooled)
            parts.append(pooled.flatten(2))
        return self.norm(torch.cat(parts, dim=2).transpose(1, 2))

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys and values [B, heads, L, d] from a normalised key map."""
        tokens = self.key_value_proj(self.pooled_tokens(kv))
        b, n, _ = tokens.shape
        k, v = tokens.view(b, n, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query_proj(to_tokens(x)).view(b, h * w, self.num_heads, -1).transpose(1, 2)
        if k.shape[0] != b:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return from_tokens(self.proj(out), h, w)


class PoolingBlock(nn.Module):
    """x + attn(norm1(x), norm_kv(kv)); x + mlp(norm2(x)). All norms are GroupNorm(1, E)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, ratios: tuple[int, ...], target: int, drop_path: float):
        super().__init__()
        hidden = dim * mlp_ratio
        self.norm1 = nn.GroupNorm(1, dim)
        self.norm_kv = nn.GroupNorm(1, dim)
        self.attn = PoolingAttention(dim, heads, ratios, target)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.Hardswish(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.Hardswish(),
            nn.Conv2d(hidden, dim, 1),
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.keys_values(group_norm(kv, self.norm_kv))

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                cached: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Self-attention when kv is None and nothing is cached; else cross-attention to kv / cached keys."""
        k, v = cached if cached is not None else self.keys_values(x if kv is None else kv)
        x = x + self.drop_path(self.attn(group_norm(x, self.norm1), k, v))
        return x + self.drop_path(self.inverted_bottleneck(group_norm(x, self.norm2)))

    def inverted_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """`mlp` (1x1 conv, Hardswish, depthwise 3x3, Hardswish, 1x1 conv) run channels-last."""
        expand, _, depthwise, _, project = self.mlp
        y = F.hardswish(linear_1x1(x, expand), inplace=not torch.is_grad_enabled())
        y = F.hardswish(depthwise(y.contiguous(memory_format=torch.channels_last)),
                        inplace=not torch.is_grad_enabled())
        return linear_1x1(y, project)


class PatchMerging(nn.Module):
    """Unfold 3x3/stride 2/pad 1 (channel-major C*9), LayerNorm(9C), Linear(9C -> C_next, no bias)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(9 * dim)
        self.reduction = nn.Linear(9 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        patches = F.unfold(x, kernel_size=3, stride=2, padding=1).transpose(1, 2)
        return from_tokens(self.reduction(self.norm(patches)), (h + 1) // 2, (w + 1) // 2)


class Stage(nn.Module):
    def __init__(self, blocks: list[PoolingBlock], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample


class RefineStage(nn.Module):
    """Self-attention blocks run on the zoom-in crop (or the whole map without an ROI), pasted back."""

    def __init__(self, blocks: list[PoolingBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, roi: Roi | None) -> torch.Tensor:
        if roi is None:
            for blk in self.blocks:
                x = blk(x)
            return x
        left, up, right, bottom = roi
        crop = x[:, :, up:bottom, left:right]
        for blk in self.blocks:
            crop = blk(crop)
        out = x.clone()
        out[:, :, up:bottom, left:right] = crop
        return out


@dataclass
class IMSACache:
    """Click-independent keys/values of each coarse stage's first (cross-attention) block."""

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]


class IMSA(nn.Module):
    """The I-MSA neck: pyramid + reference-label map -> 4 click-aware maps with the pyramid's shapes."""

    strides = (4, 8, 16, 32)

    def __init__(self, cfg: IMSAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Parameter(torch.empty(cfg.num_ref_values, cfg.dims[0]))
        nn.init.xavier_normal_(self.patch_embed)
        total = sum(cfg.depths)
        rates = linear_rates(cfg.drop_path_rate, total)
        stages, refines, k = [], [], 0
        for i, dim in enumerate(cfg.dims):
            def block(j: int) -> PoolingBlock:
                return PoolingBlock(dim, cfg.num_heads[i], cfg.mlp_ratios[i], cfg.pool_ratios[i],
                                    cfg.target_sizes[i], rates[j])
            coarse = [block(k + j) for j in range(cfg.coarse_depths[i])]
            refine = [block(k + cfg.coarse_depths[i] + j) for j in range(cfg.refine_depths[i])]
            k += cfg.depths[i]
            down = PatchMerging(dim, cfg.dims[i + 1]) if i + 1 < len(cfg.dims) else None
            stages.append(Stage(coarse, down))
            refines.append(RefineStage(refine) if refine else nn.Identity())
        self.stages = nn.ModuleList(stages)
        self.refine_stages = nn.ModuleList(refines)
        for i, dim in enumerate(cfg.dims):
            self.add_module(f"norm{i}", nn.GroupNorm(1, dim))

    @property
    def has_refine(self) -> bool:
        return any(d > 0 for d in self.cfg.refine_depths)

    def ref_embed(self, ref_label: torch.Tensor) -> torch.Tensor:
        """Embedding of a [B,1,H,W] reference-label map at stride 4: [B, E0, H/4, W/4].

        Equal to one_hot(ref_label) @ patch_embed followed by bilinear x1/4 resize (align_corners=False):
        for H divisible by 4 that resize averages rows {4i+1, 4i+2} x cols {4j+1, 4j+2}, so only those
        pixels are looked up and the full-resolution embedding is never built.
        """
        lab = ref_label[:, 0]
        n = self.cfg.num_ref_values
        e = self.patch_embed
        # The average of the four looked-up embeddings, for all n^4 label combinations, in the same
        # arithmetic as the bilinear kernel (0.5-weighted pairs per row, then rows).
        ab = (0.5 * e[:, None, :] + 0.5 * e[None, :, :]).reshape(n * n, -1)
        table = (ab[:, None, :] * 0.5 + ab[None, :, :] * 0.5).reshape(n ** 4, -1)
        def at(r: int, c: int) -> torch.Tensor:  # only the sampled pixels are widened to int64
            return lab[:, r::4, c::4].long()

        code = ((at(1, 1) * n + at(1, 2)) * n + at(2, 1)) * n + at(2, 2)
        emb = table[code]
        return emb.permute(0, 3, 1, 2)

    def precompute(self, pyramid: list[torch.Tensor]) -> IMSACache:
        """Keys/values of every coarse stage's cross-attention block (click-independent)."""
        return IMSACache([stage.blocks[0].keys_values(p) for stage, p in zip(self.stages, pyramid)])

    def forward(self, pyramid: list[torch.Tensor], ref_label: torch.Tensor, roi: Roi | None = None,
                cache: IMSACache | None = None) -> list[torch.Tensor]:
        x = (pyramid[0] + self.ref_embed(ref_label)).contiguous(memory_format=torch.channels_last)
        outs = []
        for i, stage in enumerate(self.stages):
            cached = cache.keys_values[i] if cache is not None else None
            x = stage.blocks[0](x, kv=pyramid[i], cached=cached)
            for blk in stage.blocks[1:]:
                x = blk(x)
            out = x
            if i + 1 < len(self.stages):
                x = stage.downsample(out)
            refine = self.refine_stages[i]
            if isinstance(refine, RefineStage):
                out = refine(out, None if roi is None else tuple(v // self.strides[i] for v in roi))
            outs.append(group_norm(out, getattr(self, f"norm{i}")))
        return outs
