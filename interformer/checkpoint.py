"""Loading and saving InterFormer weights (spec §9).

Accepted inputs: the official mmcv checkpoint ({'meta', 'state_dict', maybe 'optimizer'}), a bare state
dict, our own checkpoints (the same layout, with `meta['interformer']` naming the variant), and MAE /
timm-style ViT weights (mapped by `checkpoint_filter_fn`, for training from a pretrained ViT). Keys map
1:1 onto our modules; `relative_position_index` buffers are regenerated, never required.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .config import CONFIGS, get_config
from .modeling import InterFormer
from .modeling.interformer import RANDOM_INIT


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_version(checkpoint: str | os.PathLike | None, variant: str, seed: int = 0) -> str:
    """The name predictions carry for these weights: `interformer-<variant>-<file stem>-<sha256[:8]>`, or
    `interformer-<variant>-random-init-seed<N>`. The backend and bulk pre-annotation use the same name, so
    neither adds a second prediction of the same weights to a task."""
    if checkpoint is None:
        return f"interformer-{variant}-random-init-seed{seed}"
    return f"interformer-{variant}-{Path(checkpoint).stem}-{file_sha256(checkpoint)[:8]}"


def random_init_id(model: InterFormer) -> str:
    """The `checkpoint_id` of randomly initialised weights: RANDOM_INIT's first word and a digest of the
    weights themselves, so that every seed (and any change to the initialisation) gets its own
    fingerprint and the features of different random encoders never mix in one table."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{RANDOM_INIT.split('-')[0]}-{h.hexdigest()}"


def _numpy_globals() -> list[Any]:
    """What unpickling numpy scalars and plain-dtype arrays needs (an mmcv checkpoint's `meta` may hold a
    numpy seed or palette); object arrays stay refused."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
              np.float16, np.float32, np.float64, np.complex64, np.complex128, np.str_, np.bytes_]
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype,
            *{type(np.dtype(t)) for t in dtypes}]


def load_torch_file(path: str | os.PathLike) -> Any:
    """`torch.load` that never runs code from the file: tensors, plain Python values and numpy scalars and
    arrays only. A checkpoint that pickles anything else (a class, a function) is refused with
    `CheckpointError`, because unpickling it could execute arbitrary code."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(exc))
        if found is None:
            detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(exc), re.S)
            raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch file?): "
                                  f"{(detail.group(1) if detail else str(exc).splitlines()[-1])[:300]}") from exc
        raise CheckpointError(
            f"checkpoint {path} holds a Python object of type {found.group(1)}, not only weights; unpickling it "
            "could run code, so it is not loaded. If you trust the file, keep only its weights with "
            f"torch.save({{'state_dict': torch.load(path, weights_only=False)['state_dict']}}, new_path) "
            "and pass the new file") from exc
    except Exception as exc:  # torch raises several types for truncated/corrupt zip or pickle data
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch file?): {exc}") from exc


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint file -> (state dict, meta). Clear errors for missing, truncated, foreign or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    obj = load_torch_file(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    meta = obj.get("meta")
    meta = {} if meta is None else meta
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"checkpoint {path}: 'meta' is a {type(meta).__name__}, expected a dict")
    state_dict = None
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            state_dict = dict(obj[key])
            break
    if state_dict is None:
        if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"checkpoint {path} has no 'state_dict' and is not a bare state dict")
        state_dict = dict(obj)
    bad = [str(k) for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path}: {len(bad)} state-dict entries are not named tensors "
                              f"(e.g. {bad[0][:80]!r})")
    return state_dict, dict(meta)


def checkpoint_variant(meta: Mapping[str, Any], path: str | os.PathLike) -> str | None:
    """The variant our own checkpoints name in `meta['interformer']['variant']`, checked; None if not named."""
    ours = meta.get("interformer")
    if ours is None:
        return None
    variant = ours.get("variant") if isinstance(ours, Mapping) else None
    if variant is None:
        return None
    if not isinstance(variant, str) or variant not in CONFIGS:
        raise CheckpointError(f"checkpoint {path} names an unknown variant {variant!r} in meta['interformer'] "
                              f"(known: {', '.join(sorted(CONFIGS))})")
    return variant


_TIMM_RULES = [
    (r"^blocks\.", "layers."),
    (r"\.norm1\.", ".ln1."),
    (r"\.norm2\.", ".ln2."),
    (r"\.mlp\.fc1\.", ".ffn.layers.0.0."),
    (r"\.mlp\.fc2\.", ".ffn.layers.1."),
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"\.ls1\.gamma$", ".gamma_1"),
    (r"\.ls2\.gamma$", ".gamma_2"),
]


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Map a foreign state dict onto our names.

    - strips a DDP `module.` prefix;
    - MAE / timm ViT weights (`blocks.i.norm1`, `mlp.fc1`, `patch_embed.proj`, split q/v biases) become
      `backbone.layers.i.ln1`, `ffn.layers.0.0`, ... with a zero k bias (softmax ignores it); the
      classifier head and final norm (unused: final_norm=False) are dropped;
    - drops `relative_position_index` buffers (regenerated by the model).
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    items = [(k[7:] if k.startswith("module.") else k, v) for k, v in state_dict.items()]
    foreign_vit = any(k.startswith("blocks.") for k, _ in items)
    for key, value in items:
        if key.endswith("relative_position_index"):
            continue
        if foreign_vit:
            if key.startswith(("head.", "fc_norm.", "norm.", "decoder", "mask_token")) or key.endswith("q_bias") \
                    or key.endswith("v_bias"):
                continue
            for pattern, repl in _TIMM_RULES:
                key = re.sub(pattern, repl, key)
            key = "backbone." + key
        out[key] = value
    if foreign_vit:
        named = dict(items)
        for key, value in items:
            if key.endswith("attn.q_bias") or key.endswith("attn.v_bias"):
                stem = key[: -len("q_bias")]
                q_bias, v_bias = named.get(stem + "q_bias"), named.get(stem + "v_bias")
                if q_bias is None or v_bias is None or q_bias.shape != v_bias.shape or q_bias.dim() != 1:
                    raise CheckpointError(
                        f"ViT weights hold {stem}q_bias {_shape(q_bias)} and {stem}v_bias {_shape(v_bias)}: MAE "
                        "attention needs both, as vectors of one length (they become the qkv bias)")
                prefix = "backbone." + re.sub(r"^blocks\.", "layers.", stem)
                out[prefix + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return out


def _shape(t: torch.Tensor | None) -> str:
    return "(absent)" if t is None else str(tuple(t.shape))


def detect_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name of the config whose backbone width, depth and I-MSA depths fit the state dict."""
    key = "backbone.patch_embed.projection.weight"
    if key not in state_dict:
        raise CheckpointError(f"not an InterFormer checkpoint: no {key!r}")
    if state_dict[key].dim() != 4:
        raise CheckpointError(f"not an InterFormer checkpoint: {key!r} has shape {tuple(state_dict[key].shape)}")
    width = state_dict[key].shape[0]
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("backbone.layers.")})
    refine = any(k.startswith("neck.refine_stages.") for k in state_dict)
    for name, cfg in CONFIGS.items():
        if cfg.vit.embed_dim == width and cfg.vit.depth == depth and (any(cfg.imsa.refine_depths) == refine):
            return name
    raise CheckpointError(f"no known variant has a ViT of width {width} and depth {depth} (refine={refine})")


def load_state_dict_strict(model: InterFormer, state_dict: Mapping[str, torch.Tensor], allow_missing_aux: bool = True,
                           allow_missing_neck_and_heads: bool = False) -> None:
    """Load with a full report: every missing, unexpected and mis-shaped key in one error."""
    check_state_dict(model, state_dict, allow_missing_aux, allow_missing_neck_and_heads)
    model.load_state_dict({k: v for k, v in state_dict.items() if not k.endswith("relative_position_index")},
                          strict=False)


def check_state_dict(model: InterFormer, state_dict: Mapping[str, torch.Tensor], allow_missing_aux: bool = True,
                     allow_missing_neck_and_heads: bool = False) -> None:
    """CheckpointError listing every missing, unexpected and mis-shaped key, unless the state dict fits."""
    own = model.state_dict()
    sd = {k: v for k, v in state_dict.items() if not k.endswith("relative_position_index")}
    missing = [k for k in own if k not in sd and not k.endswith("relative_position_index")]
    if allow_missing_aux:
        missing = [k for k in missing if not k.startswith("auxiliary_head.")]
    if allow_missing_neck_and_heads:
        missing = [k for k in missing if k.startswith("backbone.layers") or k in (
            "backbone.cls_token", "backbone.pos_embed") or k.startswith("backbone.patch_embed")]
        missing = [k for k in missing if "relative_position_bias_table" not in k]
    unexpected = [k for k in sd if k not in own]
    misshaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or misshaped:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                shown = "\n    ".join(keys[:20]) + (f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else "")
                parts.append(f"  {len(keys)} {title} keys:\n    {shown}")
        raise CheckpointError(f"state dict does not fit InterFormer-{model.config.name}:\n" + "\n".join(parts))


def _checked_weights(checkpoint: str | os.PathLike, variant: str | None) -> tuple[dict[str, torch.Tensor], str]:
    state_dict, meta = read_checkpoint(checkpoint)
    state_dict = checkpoint_filter_fn(state_dict)
    found = checkpoint_variant(meta, checkpoint) or detect_variant(state_dict)
    if variant is not None and variant != found:
        raise CheckpointError(f"checkpoint {checkpoint} holds InterFormer-{found}, not InterFormer-{variant}")
    return state_dict, found


def check_checkpoint(checkpoint: str | os.PathLike, variant: str | None = None) -> str:
    """The variant a checkpoint holds, once it is known to load (CheckpointError otherwise). Builds no weights
    (the model is laid out on the meta device), so entry points call it before they start anything."""
    state_dict, found = _checked_weights(checkpoint, variant)
    with torch.device("meta"):
        model = InterFormer(get_config(found))
    check_state_dict(model, state_dict)
    return found


def load_model(checkpoint: str | os.PathLike | None, variant: str | None = None,
               device: str | torch.device | None = None) -> InterFormer:
    """Build InterFormer and load weights from `checkpoint` (None: random init; then `variant` is required).

    The variant is detected from the checkpoint; naming a different one raises (e.g. a Tiny
    checkpoint loaded as Light). The returned model is in eval mode and carries `checkpoint_id`
    (sha256 of the file, or "random-" and a digest of the drawn weights) for fingerprints.
    """
    if checkpoint is None:
        if variant is None:
            raise ValueError("load_model(None) builds a randomly initialised model: name its variant")
        model = InterFormer(get_config(variant))
        model.checkpoint_id = random_init_id(model)
        model.checkpoint_path = None
    else:
        state_dict, found = _checked_weights(checkpoint, variant)
        model = InterFormer(get_config(found))
        load_state_dict_strict(model, state_dict)
        model.checkpoint_id = file_sha256(checkpoint)
        model.checkpoint_path = str(checkpoint)
    if device is not None:
        model.to(device)
    return model.eval()


def save_checkpoint(model: InterFormer, path: str | os.PathLike, meta: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """Write the official layout {'meta', 'state_dict'} (+ `extra` entries such as optimizer state).

    The state dict keeps the official names and includes the regenerable `relative_position_index`
    buffers, so the official code can load it too.
    """
    meta = dict(meta or {})
    meta.setdefault("CLASSES", ("Background", "Foreground"))
    meta["interformer"] = {"variant": model.config.name, "config": model.config.to_dict()}
    obj = {"meta": meta, "state_dict": OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())}
    obj.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # one per writer
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
