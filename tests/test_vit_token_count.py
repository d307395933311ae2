"""The ViT's flexible input size decides by token count, as the official `mae.py` does: a grid with as many
tokens as the training grid (16x64 for a 32x32 window: a 256x1024 input) reads the trained position tables
unresized, row-major; only a different count is nearest-resized. Checked over every grid shape against a
transcription of the official computation (MAEWithSimpleFPN.forward's `pos_embed.size(1) == h*w + 1` test and
FlexSizeMAEAttention's `attn.size()[1:] != bias.size()` test with its four-block nearest resize), on a small
window so that every way of factoring its token count is cheap."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from interformer.config import ViTConfig
from interformer.encode_engine import token_index
from interformer.modeling.vit import MAEViT

WINDOW = 4  # train_size 64 / patch 16: 16 tokens, factored as 1x16, 2x8, 4x4, 8x2, 16x1


@pytest.fixture(scope="module")
def vit() -> MAEViT:
    torch.manual_seed(0)
    model = MAEViT(ViTConfig(embed_dim=24, depth=2, num_heads=2, train_size=16 * WINDOW, drop_path_rate=0.0))
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.relative_position_bias_table.normal_()  # zeros at init would hide any bias mix-up
    return model.eval()


def _official_bias_resize(bias: torch.Tensor, window: int, grid: tuple[int, int]) -> torch.Tensor:
    """[heads, 1+n, 1+n] -> [heads, 1+h*w, 1+h*w]: the cls row, cls column and patch block resized apart."""
    heads, n = bias.shape[0], window * window
    h, w = grid

    def resize(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=grid, mode="nearest")

    corner = bias[:, :1, :1]
    row = resize(bias[:, :1, 1:].reshape(heads, 1, window, window)).reshape(heads, 1, h * w)
    col = resize(bias[:, 1:, :1].reshape(heads, 1, window, window)).reshape(heads, h * w, 1)
    block = resize(bias[:, 1:, 1:].reshape(heads, n, window, window)).reshape(heads, n, h * w)
    block = resize(block.transpose(1, 2).reshape(heads, h * w, window, window)).reshape(heads, h * w, h * w)
    return torch.cat([torch.cat([corner, row], 2), torch.cat([col, block.transpose(1, 2)], 2)], 1)


def _official_tokens(vit: MAEViT, img: torch.Tensor) -> torch.Tensor:
    x = vit.patch_embed.projection(img)
    grid = (x.shape[2], x.shape[3])
    x = x.flatten(2).transpose(1, 2)
    if vit.pos_embed.shape[1] == grid[0] * grid[1] + 1:
        pos = vit.pos_embed
    else:
        table = vit.pos_embed[:, 1:].reshape(1, WINDOW, WINDOW, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=grid, mode="nearest").flatten(2).transpose(1, 2)
        pos = torch.cat([vit.pos_embed[:, :1], table], 1)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], 1) + pos
    for layer in vit.layers:
        attn = layer.attn
        y = layer.ln1(x)
        b, n, c = y.shape
        q, k, v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        m = WINDOW * WINDOW + 1
        bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(m, m, -1)
        bias = bias.permute(2, 0, 1)
        if scores.shape[1:] != bias.shape:
            bias = _official_bias_resize(bias, WINDOW, grid)
        out = ((scores + bias.unsqueeze(0)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + layer.gamma_1 * attn.proj(out)
        x = x + layer.gamma_2 * layer.ffn(layer.ln2(x))
    return x


grids = st.tuples(st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=40, deadline=None)
@given(grid=grids, seed=st.integers(0, 2**16))
@example(grid=(1, 16), seed=0)
@example(grid=(2, 8), seed=0)
@example(grid=(8, 2), seed=0)
@example(grid=(16, 1), seed=0)
@example(grid=(4, 4), seed=0)
def test_the_vit_matches_the_official_flexible_size_at_every_grid(vit, grid, seed):
    img = torch.randn(1, 3, 16 * grid[0], 16 * grid[1], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = _official_tokens(vit, img)
        got, got_grid = vit.forward_tokens(img)
    assert got_grid == grid
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1), (16, 64), (64, 16), (32, 32)])
def test_the_runtime_gather_is_the_identity_at_the_training_token_count(grid):
    window = 4 if grid[0] * grid[1] == 16 else 32
    assert torch.equal(token_index(grid, window), torch.arange(1 + grid[0] * grid[1]))
