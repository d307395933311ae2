"""Initial weights for training: random, an InterFormer checkpoint (official or ours), or plain MAE ViT weights.

A file whose (mapped) keys include the neck is a full InterFormer checkpoint and goes through
`load_model`. Otherwise it is taken as ViT weights (MAE / timm names, mapped by
`checkpoint_filter_fn`, spec §2): the patch-part of pos_embed is bicubic-resized to the training grid as
mmseg's MAE does at load time; layer scales (init 1.0), the relative-position tables (init 0), the
SimpleFPN, the neck and the heads keep their initialisation.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointError, check_checkpoint, checkpoint_filter_fn, load_model, read_checkpoint
from ..config import get_config
from ..modeling import InterFormer
from .runlog import nonfinite_tensors, shown_names

VIT_OPTIONAL = ("gamma_1", "gamma_2", "relative_position_bias_table")


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[1, 1 + s^2, C] -> [1, 1 + num_patches, C], bicubic on the square patch grid (cls position kept)."""
    shape = tuple(pos_embed.shape)
    if pos_embed.dim() != 3 or shape[0] != 1 or shape[1] < 2:
        raise CheckpointError(f"pos_embed has shape {shape}; ViT weights need [1, 1 + n*n, C] (a class-token "
                              "position followed by a square grid of at least one patch position)")
    old = shape[1] - 1
    if old == num_patches:
        return pos_embed
    s_old, s_new = math.isqrt(old), math.isqrt(num_patches)
    if s_old * s_old != old or s_new * s_new != num_patches:
        raise CheckpointError(f"pos_embed of shape {shape} has {old} patch positions after the class token, which is "
                              "not a square grid (a distillation token or no class token?)")
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    c = grid.shape[-1]
    grid = grid.reshape(1, s_old, s_old, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(s_new, s_new), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, s_new * s_new, c)], dim=1)


def fitted_vit_weights(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], name: str
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Mapped ViT weights checked against a model's state dict `own` (pos_embed resized to its grid), and the
    names of ViT parameters they leave at init. CheckpointError on unknown keys, mis-shaped tensors or missing
    required ViT weights."""
    sd = dict(state_dict)
    if "backbone.pos_embed" in sd:
        sd["backbone.pos_embed"] = resize_pos_embed(sd["backbone.pos_embed"], own["backbone.pos_embed"].shape[1] - 1)
    unexpected = [k for k in sd if k not in own]
    misshaped = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sd if k in own and sd[k].shape != own[k].shape]
    vit_keys = [k for k in own if k.startswith(("backbone.layers.", "backbone.patch_embed.")) or k in (
        "backbone.cls_token", "backbone.pos_embed")]
    missing = [k for k in vit_keys if k not in sd and not k.endswith("relative_position_index")]
    required_missing = [k for k in missing if not k.endswith(VIT_OPTIONAL)]
    if unexpected or misshaped or required_missing:
        lines = [f"{title}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for title, keys in (("unexpected", unexpected), ("mis-shaped", misshaped),
                                     ("missing", required_missing)) if keys]
        raise CheckpointError(f"ViT weights do not fit InterFormer-{name}: " + "; ".join(lines))
    return sd, missing


def load_vit_weights(model: InterFormer, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Copy mapped ViT weights into `model.backbone`; returns the names of ViT parameters left at init.
    Raises CheckpointError on unknown keys, mis-shaped tensors or missing required ViT weights."""
    sd, missing = fitted_vit_weights(model.state_dict(), state_dict, model.config.name)
    model.load_state_dict(sd, strict=False)
    return missing


def _mapped_init(init: str) -> tuple[Path, dict[str, torch.Tensor], bool]:
    """(path, mapped state dict, whether it is a full InterFormer checkpoint) of an --init file; CheckpointError
    when a weight is NaN or infinite."""
    path = Path(init)
    state_dict, _ = read_checkpoint(path)
    bad = nonfinite_tensors(state_dict)
    if bad:
        raise CheckpointError(f"--init {path} holds NaN or infinite weights ({shown_names(bad)}); a run would "
                              "train on NaN from the first iteration")
    mapped = checkpoint_filter_fn(state_dict)
    return path, mapped, any(k.startswith("neck.") for k in mapped)


def check_init(variant: str, init: str | None) -> None:
    """Check that `init` gives `variant` its starting weights, without building any (the model is laid out on
    the meta device), so a job refuses a bad --init before Ray or workers start. CheckpointError otherwise."""
    if init is None:
        return
    path, mapped, full = _mapped_init(init)
    if full:
        check_checkpoint(path, variant)
        return
    with torch.device("meta"):
        own = InterFormer(get_config(variant)).state_dict()
    fitted_vit_weights(own, mapped, variant)


def initial_model(variant: str, init: str | None) -> tuple[InterFormer, str]:
    """The model a run starts from, and a one-line description of where its weights came from."""
    if init is None:
        return load_model(None, variant=variant), "random init"
    path, mapped, full = _mapped_init(init)
    if full:
        return load_model(path, variant=variant), f"InterFormer checkpoint {path}"
    model = load_model(None, variant=variant)
    left = load_vit_weights(model, mapped)
    note = f" ({len(left)} ViT tensors left at init: layer scales / rel-pos tables)" if left else ""
    return model, f"ViT weights {path}{note}"
