"""AdamW with layer-wise lr decay and the poly + linear-warm-up schedule, as mmseg 0.26 builds them (spec §6).

Layer ids follow mmseg's `get_layer_id_for_vit` with num_layers = N + 2: 0 for backbone.patch_embed,
backbone.cls_token, backbone.pos_embed (and mask_token); i + 1 for backbone.layers.i; N + 1 for everything
else (backbone.fpn, neck, heads). The lr scale is rate ** (N + 1 - layer_id): rate^(N+1) for the embeddings,
rate^(N-i) for layer i and 1 for the rest.
Weight decay is 0 for 1-D parameters and names ending in `.bias`; everything else, including pos_embed,
cls_token and the relative-position tables, is decayed (mmseg checks the unprefixed names 'pos_embed' /
'cls_token', which never match `backbone.pos_embed`).
Schedule (mmcv PolyLrUpdaterHook, by iteration): lr = (base - min_lr) * (1 - it / max_iters) ** power + min_lr;
during warm-up (it < warmup_iters) it is multiplied by 1 - (1 - it / warmup_iters) * (1 - warmup_ratio).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from ..cli_types import FRACTION, POSITIVE, integer, real

EMBED_NAMES = ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and schedule hyper-parameters (official: lr 1e-4, wd 0.05, 1500 warm-up iterations)."""

    lr: float = field(default=1e-4, metadata={"range": POSITIVE, "help": "AdamW base learning rate"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"range": real(0, maximum=1),
        "help": "AdamW betas"})
    weight_decay: float = field(default=0.05, metadata={"range": real(0),
        "help": "AdamW weight decay (not on 1-D params / biases)"})
    layer_decay_rate: float | None = field(default=None, metadata={"range": real(above=0, maximum=1),
        "help": "layer-wise lr decay of the ViT; default: the variant's (0.65 light/small, 0.75 tiny)"})
    warmup_iters: int = field(default=1500, metadata={"range": integer(0), "help": "linear warm-up iterations"})
    warmup_ratio: float = field(default=1e-6, metadata={"range": FRACTION,
        "help": "lr factor at the first warm-up iteration"})
    power: float = field(default=1.0, metadata={"range": real(0), "help": "poly schedule power"})
    min_lr: float = field(default=0.0, metadata={"range": real(0), "help": "lr reached at the last iteration"})


def layer_id(name: str, num_layers: int) -> int:
    """mmseg layer id of a parameter for a ViT backbone with `num_layers` blocks (0 .. num_layers + 1)."""
    if name in EMBED_NAMES or name.startswith("backbone.patch_embed"):
        return 0
    if name.startswith("backbone.layers."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def lr_scale(name: str, num_layers: int, decay_rate: float) -> float:
    """Multiplier of the base lr for parameter `name`."""
    return decay_rate ** (num_layers + 1 - layer_id(name, num_layers))


def uses_weight_decay(name: str, shape: Sequence[int]) -> bool:
    """mmseg's rule: no decay for 1-D tensors and biases; the unprefixed-name check never matches, so it is omitted."""
    return not (len(shape) == 1 or name.endswith(".bias"))


def param_group_key(name: str, shape: Sequence[int], num_layers: int) -> str:
    """Group name as mmseg forms it, e.g. 'layer_3_decay' / 'layer_13_no_decay'."""
    return f"layer_{layer_id(name, num_layers)}_{'decay' if uses_weight_decay(name, shape) else 'no_decay'}"


def build_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    num_layers: int,
    decay_rate: float,
    lr: float,
    weight_decay: float,
) -> list[dict]:
    """Parameter groups for torch.optim: one per (layer id, decay/no-decay), with `lr_scale`, `initial_lr`
    and `param_names`; frozen parameters (requires_grad False) are left out, as mmseg does."""
    groups: dict[str, dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        key = param_group_key(name, tuple(p.shape), num_layers)
        if key not in groups:
            scale = lr_scale(name, num_layers, decay_rate)
            groups[key] = {
                "params": [],
                "param_names": [],
                "group_name": key,
                "lr_scale": scale,
                "lr": scale * lr,
                "initial_lr": scale * lr,
                "weight_decay": weight_decay if uses_weight_decay(name, p.shape) else 0.0,
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    if not groups:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig, num_layers: int, default_decay_rate: float) -> torch.optim.AdamW:
    """AdamW over the layer-decay groups of `model` (names as in the official state dict, spec §9)."""
    rate = cfg.layer_decay_rate if cfg.layer_decay_rate is not None else default_decay_rate
    groups = build_param_groups(model.named_parameters(), num_layers, rate, cfg.lr, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_at(base_lr: float, it: int, max_iters: int, cfg: OptimConfig) -> float:
    """Learning rate of a group with initial lr `base_lr` for (0-based) iteration `it`."""
    if max_iters <= 0:
        raise ValueError(f"max_iters must be positive, got {max_iters}")
    progress = min(max(it, 0), max_iters)
    lr = (base_lr - cfg.min_lr) * (1.0 - progress / max_iters) ** cfg.power + cfg.min_lr
    if cfg.warmup_iters > 0 and it < cfg.warmup_iters:
        k = (1.0 - it / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
        lr *= 1.0 - k
    return lr


def set_lr(optimizer: torch.optim.Optimizer, it: int, max_iters: int, cfg: OptimConfig) -> float:
    """Set every group's lr for iteration `it` (called before the iteration's step); returns the base-scale lr."""
    for g in optimizer.param_groups:
        g["lr"] = lr_at(g["initial_lr"], it, max_iters, cfg)
    return lr_at(cfg.lr, it, max_iters, cfg)
