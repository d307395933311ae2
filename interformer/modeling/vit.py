"""MAE ViT with per-layer BEiT-style relative position bias and the official flexible input size (spec §2).

Parameter names follow the official mmseg layout (layers.{i}.ln1, attn.qkv, ffn.layers.0.0, gamma_1, ...)
so official checkpoints load 1:1. At the training grid (32x32 tokens for 512x512) this is a plain BEiT
layer; at other sizes the absolute position embedding and the [heads, 1+N, 1+N] bias matrix are
nearest-resized from the training grid, exactly as `FlexSizeMAEAttention` does, instead of being
re-derived from relative offsets. As there, what decides is the token count, not the grid's shape: a grid
with as many tokens as the training grid (16x64 for a 32x32 window) uses the tables unresized, in row-major
order (`keeps_training_tables`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ViTConfig
from .layers import DropPath, linear_rates


def beit_relative_position_index(window: int) -> torch.Tensor:
    """BEiT index [1+w², 1+w²] into a table of (2w-1)²+3 rows; the last 3 rows serve the cls token."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel = rel + (window - 1)
    n = window * window
    num_rel = (2 * window - 1) ** 2
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = rel[..., 0] * (2 * window - 1) + rel[..., 1]
    index[0, 1:] = num_rel
    index[1:, 0] = num_rel + 1
    index[0, 0] = num_rel + 2
    return index


def keeps_training_tables(grid: tuple[int, int], window: int) -> bool:
    """Whether an h x w patch grid uses the trained position tables as they are. The official code resizes them
    only when the token count differs (`pos_embed.size(1) != h*w + 1`, `attn.size() != bias.size()`), so a
    non-square grid with window² tokens reads the square tables row-major, unresized."""
    return grid[0] * grid[1] == window * window


def nearest_grid_index(src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Flat indices into a src grid picked by F.interpolate(mode='nearest', size=dst), as a 1-D long tensor."""
    grid = torch.arange(src[0] * src[1], dtype=torch.float64).view(1, 1, *src)
    return F.interpolate(grid, size=dst, mode="nearest").view(-1).round().long()


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.projection(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class FFN(nn.Module):
    """mmcv FFN layout: layers.0.0 = fc1 (+GELU), layers.1 = fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU()), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class RelPosAttention(nn.Module):
    """Global multi-head attention with a learned relative position bias table (one per layer)."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.window = window
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2 + 3, num_heads))
        self.register_buffer("relative_position_index", beit_relative_position_index(window), persistent=True)

    def bias_matrix(self, grid: tuple[int, int]) -> torch.Tensor:
        """[heads, 1+h*w, 1+h*w] bias; nearest-resized from the training window when the token count differs."""
        n = self.window * self.window
        full = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        full = full.view(n + 1, n + 1, self.num_heads).permute(2, 0, 1)
        if keeps_training_tables(grid, self.window):
            return full.contiguous()
        idx = nearest_grid_index((self.window, self.window), grid).to(full.device) + 1
        idx = torch.cat([idx.new_zeros(1), idx])
        return full[:, idx][:, :, idx].contiguous()

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)) + bias.unsqueeze(0)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.gamma_1 = nn.Parameter(torch.full((dim,), cfg.layer_scale_init))
        self.gamma_2 = nn.Parameter(torch.full((dim,), cfg.layer_scale_init))
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RelPosAttention(dim, cfg.num_heads, cfg.window)
        self.ln2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = FFN(dim, int(dim * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.ln1(x), self.attn.bias_matrix(grid)))
        return x + self.drop_path(self.gamma_2 * self.ffn(self.ln2(x)))


class MAEViT(nn.Module):
    """The ViT trunk: patch embedding, cls token, absolute + relative positions, no final norm.

    `forward` returns the last layer's patch tokens as a [B, C, H/16, W/16] map (cls token dropped).
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.window * cfg.window + 1, dim))
        self.patch_embed = PatchEmbed(dim, cfg.patch_size)
        rates = linear_rates(cfg.drop_path_rate, cfg.depth)
        self.layers = nn.ModuleList(TransformerLayer(cfg, r) for r in rates)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def resized_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        w = self.cfg.window
        if keeps_training_tables(grid, w):
            return self.pos_embed
        patch = self.pos_embed[:, 1:].reshape(1, w, w, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=grid, mode="nearest").flatten(2).transpose(1, 2)
        return torch.cat([self.pos_embed[:, :1], patch], dim=1)

    def forward_tokens(self, img: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """All tokens (cls first) after the last layer, and the patch grid size."""
        tokens, grid = self.patch_embed(img)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        x = x + self.resized_pos_embed(grid)
        for layer in self.layers:
            x = layer(x, grid)
        return x, grid

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x, (h, w) = self.forward_tokens(img)
        return x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
