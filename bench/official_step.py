"""A restatement of the official InterFormer per-click computation, for benchmarking in the same run.

It follows the official code's order of work (spec §4-§5 and the official `encode_decode` path): a
full-resolution one-hot reference-label embedding resized bilinearly, I-MSA keys/values recomputed from
the image features on every click, NCHW tensors with token rearranges copied, BatchNorm applied
separately, two-channel logits upsampled to the padded size and argmax'd, then the reference-label
update with two masked writes. It reads the parameters of our `InterFormer` modules, so both paths
compute the same function; `bench_model.py` checks they agree before timing them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from interformer.modeling import InterFormer
from interformer.modeling.heads import ConvModule, UPerHead
from interformer.modeling.imsa import IMSA, PoolingBlock, pooled_size


def _conv_module(m: ConvModule, x: torch.Tensor) -> torch.Tensor:
    return F.relu(m.bn(m.conv(x)))


def _attention(blk: PoolingBlock, x: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
    att = blk.attn
    b, c, hd, wd = x.shape
    q = att.query_proj(x.permute(0, 2, 3, 1).reshape(b, hd * wd, c).contiguous())
    h, w = kv_in.shape[-2:]
    kvs = []
    for ratio, dconv in zip(att.pool_ratios, att.dconvs):
        size = (pooled_size(h, att.target, ratio), pooled_size(w, att.target, ratio))
        kv = kv_in if ratio == 1 or size == (h, w) else F.adaptive_max_pool2d(kv_in, size)
        kv = kv + dconv(kv)
        kvs.append(kv.permute(0, 2, 3, 1).reshape(b, -1, c).contiguous())
    key, value = torch.chunk(att.key_value_proj(att.norm(torch.cat(kvs, dim=1))), 2, dim=-1)
    nh = att.num_heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, t.shape[1], nh, -1).permute(0, 2, 1, 3).contiguous()

    q, key, value = heads(q), heads(key), heads(value)
    attn = ((q @ key.transpose(-2, -1)) * (c // nh) ** -0.5).softmax(dim=-1)
    out = (attn @ value).permute(0, 2, 1, 3).reshape(b, hd * wd, c).contiguous()
    return att.proj(out).reshape(b, hd, wd, c).permute(0, 3, 1, 2).contiguous()


def _block(blk: PoolingBlock, x: torch.Tensor, kv_in: torch.Tensor | None = None) -> torch.Tensor:
    kv_in = x if kv_in is None else kv_in
    x = x + _attention(blk, blk.norm1(x), blk.norm_kv(kv_in))
    return x + blk.mlp(blk.norm2(x))


def _imsa(neck: IMSA, pyramid: list[torch.Tensor], ref_label: torch.Tensor) -> list[torch.Tensor]:
    emb = F.one_hot(ref_label.long(), 5).float() @ neck.patch_embed
    emb = emb[:, 0].permute(0, 3, 1, 2)
    x = pyramid[0] + F.interpolate(emb, pyramid[0].shape[-2:], mode="bilinear", align_corners=False)
    outs = []
    for i, stage in enumerate(neck.stages):
        for j, blk in enumerate(stage.blocks):
            x = _block(blk, x, pyramid[i] if j == 0 else None)
        out = x
        if hasattr(stage, "downsample"):
            b, c, h, w = x.shape
            tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c).contiguous()
            grid = tokens.view(b, h, w, c).permute(0, 3, 1, 2)
            patches = F.unfold(grid, 3, stride=2, padding=1).transpose(1, 2)
            down = stage.downsample.reduction(stage.downsample.norm(patches))
            x = down.reshape(b, (h + 1) // 2, (w + 1) // 2, -1).permute(0, 3, 1, 2).contiguous()
        outs.append(getattr(neck, f"norm{i}")(out))
    return outs


def _uper(head: UPerHead, inputs: list[torch.Tensor]) -> torch.Tensor:
    def up(t: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

    laterals = [_conv_module(conv, inputs[i]) for i, conv in enumerate(head.lateral_convs)]
    x = inputs[-1]
    psp = [x] + [up(_conv_module(m[1], m[0](x)), x.shape[2:]) for m in head.psp_modules]
    laterals.append(_conv_module(head.bottleneck, torch.cat(psp, dim=1)))
    for i in range(3, 0, -1):
        laterals[i - 1] = laterals[i - 1] + up(laterals[i], laterals[i - 1].shape[2:])
    outs = [_conv_module(conv, laterals[i]) for i, conv in enumerate(head.fpn_convs)] + [laterals[3]]
    outs = [outs[0]] + [up(o, outs[0].shape[2:]) for o in outs[1:]]
    return head.conv_seg(_conv_module(head.fpn_bottleneck, torch.cat(outs, dim=1)))


@torch.no_grad()
def official_click_step(model: InterFormer, pyramid: list[torch.Tensor], ref_label: np.ndarray, row: int, col: int,
                        positive: bool) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Click disk, encode_decode, argmax, state update, crop-free: returns (pred, new ref_label, logits)."""
    h, w = ref_label.shape
    yy, xx = np.ogrid[:h, :w]
    ref = ref_label.copy()
    ref[(yy - row) ** 2 + (xx - col) ** 2 <= 25] = 4 if positive else 0
    rl = torch.from_numpy(ref.astype(np.int64))[None, None]
    logits = _uper(model.decode_head, _imsa(model.neck, pyramid, rl))
    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    pred = logits.argmax(dim=1, keepdim=True)
    fg, bg = pred == 1, pred == 0
    out = rl.clone()
    out[fg & (rl == 2)] = 3
    out[fg & (rl == 1)] = 2
    out[bg & (rl == 2)] = 1
    out[bg & (rl == 3)] = 2
    return pred[0, 0].numpy().astype(bool), out[0, 0].numpy().astype(np.uint8), logits
