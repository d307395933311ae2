"""Layer-wise lr decay groups (which lr and weight decay each parameter gets) and the poly + warm-up schedule."""
from __future__ import annotations

import json
import math

import pytest
import torch

from interformer.training.optim import (OptimConfig, build_optimizer, layer_id, lr_at, lr_scale, param_group_key,
                                        uses_weight_decay)

BUFFER_SUFFIXES = ("relative_position_index", "running_mean", "running_var", "num_batches_tracked")


def light_parameters(shared_dir) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of the official Light model, from the fixture's state-dict listing."""
    listing = json.loads((shared_dir / "fixtures/official_interformer/state_dict_light.json").read_text())
    params = [(name, tuple(shape)) for name, shape, _ in listing["state_dict"] if not name.endswith(BUFFER_SUFFIXES)]
    assert sum(math.prod(shape) for _, shape in params) == listing["num_parameters"]
    return params


def expected_scale(name: str, n: int, rate: float) -> float:
    if name in ("backbone.cls_token", "backbone.pos_embed") or name.startswith("backbone.patch_embed"):
        return rate ** (n + 1)
    if name.startswith("backbone.layers."):
        return rate ** (n - int(name.split(".")[2]))
    return 1.0


def test_light_parameter_lr_and_wd(shared_dir):
    params = light_parameters(shared_dir)
    assert len(params) == 468 - 12 - 36 - 3  # entries minus rel-pos indices and the heads' BN buffers
    n, rate = 12, 0.65
    for name, shape in params:
        assert lr_scale(name, n, rate) == pytest.approx(expected_scale(name, n, rate)), name
    by_name = dict(params)
    # spot checks with the numbers written out
    assert lr_scale("backbone.layers.11.attn.qkv.weight", n, rate) == pytest.approx(0.65)
    assert lr_scale("backbone.layers.0.ffn.layers.0.0.weight", n, rate) == pytest.approx(0.65 ** 12)
    assert lr_scale("backbone.pos_embed", n, rate) == pytest.approx(0.65 ** 13)
    for name in ("backbone.fpn.rescale_ops.0.0.weight", "neck.patch_embed", "decode_head.conv_seg.weight",
                 "auxiliary_head.convs.0.conv.weight", "neck.stages.0.blocks.0.attn.query_proj.weight"):
        assert lr_scale(name, n, rate) == 1.0
    # weight decay quirks: the embeddings and rel-pos tables ARE decayed; 1-D tensors and biases are not
    decayed = {name for name, shape in params if uses_weight_decay(name, shape)}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.layers.3.attn.relative_position_bias_table",
            "backbone.patch_embed.projection.weight", "neck.patch_embed"} <= decayed
    for name in ("backbone.layers.3.gamma_1", "backbone.layers.3.ln1.weight", "backbone.layers.3.attn.qkv.bias",
                 "neck.norm0.weight", "decode_head.bottleneck.bn.weight", "backbone.patch_embed.projection.bias"):
        assert name in by_name and name not in decayed, name
    groups = {param_group_key(name, shape, n) for name, shape in params}
    # 12 layers x (decay, no_decay) + embeddings (decay, no_decay) + the rest (decay, no_decay)
    assert len(groups) == 28
    assert layer_id("neck.patch_embed", n) == 13 and layer_id("backbone.cls_token", n) == 0


def test_tiny_rate_on_the_tiny_listing(shared_dir):
    listing = json.loads((shared_dir / "fixtures/official_interformer/state_dict_tiny.json").read_text())
    names = [name for name, _, _ in listing["state_dict"]]
    assert lr_scale("backbone.layers.23.attn.proj.weight", 24, 0.75) == pytest.approx(0.75)
    assert lr_scale("backbone.cls_token", 24, 0.75) == pytest.approx(0.75 ** 25)
    assert "neck.refine_stages.2.blocks.3.mlp.0.weight" in names
    assert lr_scale("neck.refine_stages.2.blocks.3.mlp.0.weight", 24, 0.75) == 1.0


def test_small_model_optimizer_groups(small_model):
    model = small_model
    n = model.config.vit.depth
    rate = model.config.layer_decay_rate
    opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.05), n, rate)
    seen = {}
    for g in opt.param_groups:
        for name, p in zip(g["param_names"], g["params"]):
            seen[name] = (g["lr"], g["weight_decay"])
    named = dict(model.named_parameters())
    assert set(seen) == set(named)
    for name, p in named.items():
        lr, wd = seen[name]
        assert lr == pytest.approx(1e-4 * expected_scale(name, n, rate)), name
        assert wd == (0.0 if p.ndim == 1 or name.endswith(".bias") else 0.05), name
    assert seen["backbone.layers.1.attn.qkv.weight"][0] == pytest.approx(1e-4 * 0.65)
    assert seen["backbone.layers.0.attn.qkv.weight"][0] == pytest.approx(1e-4 * 0.65 ** 2)
    assert seen["backbone.pos_embed"] == (pytest.approx(1e-4 * 0.65 ** 3), 0.05)


def test_frozen_parameters_are_left_out(small_model):
    import copy

    model = copy.deepcopy(small_model)
    model.backbone.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(), model.config.vit.depth, 0.65)
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert names and not any(n.startswith("backbone.") for n in names)
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0}


def test_poly_schedule_with_linear_warmup():
    cfg = OptimConfig(lr=1e-4, warmup_iters=1500, warmup_ratio=1e-6, power=1.0, min_lr=0.0)
    max_iters = 320_000
    assert lr_at(1e-4, 0, max_iters, cfg) == pytest.approx(1e-10, rel=1e-9)
    assert lr_at(1e-4, 750, max_iters, cfg) == pytest.approx(1e-4 * (1 - 750 / max_iters) * (0.5 + 0.5e-6), rel=1e-9)
    assert lr_at(1e-4, 1500, max_iters, cfg) == pytest.approx(1e-4 * (1 - 1500 / max_iters), rel=1e-12)
    assert lr_at(1e-4, 160_000, max_iters, cfg) == pytest.approx(0.5e-4, rel=1e-12)
    assert lr_at(1e-4, max_iters, max_iters, cfg) == 0.0
    # per-group: the decayed lr follows the same curve
    assert lr_at(0.65e-4, 160_000, max_iters, cfg) == pytest.approx(0.325e-4)
    cfg2 = OptimConfig(lr=1e-3, warmup_iters=0, power=2.0, min_lr=1e-5)
    assert lr_at(1e-3, 50, 100, cfg2) == pytest.approx((1e-3 - 1e-5) * 0.25 + 1e-5)


def test_no_trainable_parameters_is_an_error():
    m = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(m, OptimConfig(), 2, 0.65)
