"""Where training starts: plain MAE/timm ViT weights (mapped, pos_embed resized) or an InterFormer checkpoint."""
from __future__ import annotations

import pytest
import torch

from interformer.checkpoint import CheckpointError, load_model, save_checkpoint
from interformer.training.init import initial_model, resize_pos_embed


def timm_mae_state_dict(dim: int = 96, depth: int = 2, grid: int = 14) -> dict[str, torch.Tensor]:
    """A ViT state dict with the names of MAE's `mae_pretrain_vit_*.pth` (timm Block, qkv bias, final norm)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim),
          "patch_embed.proj.weight": r(dim, 3, 16, 16), "patch_embed.proj.bias": r(dim),
          "norm.weight": r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": r(dim), p + "norm1.bias": r(dim),
                   p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
                   p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "norm2.weight": r(dim), p + "norm2.bias": r(dim),
                   p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
                   p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    return sd


def test_mae_weights_map_onto_the_backbone(tmp_path):
    sd = timm_mae_state_dict()
    path = tmp_path / "mae_pretrain_vit_small.pth"
    torch.save({"model": sd}, path)
    model, origin = initial_model("small", str(path))
    assert "ViT weights" in origin
    own = model.state_dict()
    assert torch.equal(own["backbone.layers.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
    assert torch.equal(own["backbone.layers.0.ffn.layers.0.0.weight"], sd["blocks.0.mlp.fc1.weight"])
    assert torch.equal(own["backbone.patch_embed.projection.weight"], sd["patch_embed.proj.weight"])
    assert torch.equal(own["backbone.cls_token"], sd["cls_token"])
    assert own["backbone.pos_embed"].shape == (1, 1 + 32 * 32, 96)
    assert torch.equal(own["backbone.pos_embed"][:, 0], sd["pos_embed"][:, 0])
    assert torch.allclose(own["backbone.layers.0.gamma_1"], torch.ones(96))  # layer scale keeps init 1.0


def test_pos_embed_bicubic_resize():
    pe = torch.arange(1 + 4, dtype=torch.float32).reshape(1, 5, 1).repeat(1, 1, 3)
    out = resize_pos_embed(pe, 16)
    assert out.shape == (1, 17, 3)
    assert torch.equal(out[:, 0], pe[:, 0])
    ref = torch.nn.functional.interpolate(pe[:, 1:].reshape(1, 2, 2, 3).permute(0, 3, 1, 2), size=(4, 4),
                                          mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 16, 3))
    with pytest.raises(CheckpointError, match="square"):
        resize_pos_embed(torch.zeros(1, 1 + 6, 3), 16)


def test_wrong_width_vit_is_refused(tmp_path):
    path = tmp_path / "vit_b.pth"
    torch.save(timm_mae_state_dict(dim=48, depth=2), path)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        initial_model("small", str(path))


def test_interformer_checkpoint_round_trip(tmp_path, small_model):
    path = tmp_path / "ours.pth"
    save_checkpoint(small_model, path, meta={"iter": 7})
    model, origin = initial_model("small", str(path))
    assert "InterFormer checkpoint" in origin
    for k, v in small_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert load_model(path).config.name == "small"
