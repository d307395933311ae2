"""One training iteration (spec §6, `ClickSegmentor.interact_train` + `forward_train`).

1. The first click of every sample: positive, at a most interior point of its object.
2. k extra clicks (k ~ P(k) ∝ decay^k, one k per iteration): with the model in eval mode and no grad, the
   backbone runs once, then k times: predict -> update the reference labels by the prediction -> add the
   next click (sfc_inner_k rule) where the prediction is wrong.
3. The training forward with gradients on the final reference labels (backbone again, unless frozen),
   NFL on the decode head + 0.4 x NFL on the auxiliary head, one optimiser step.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..clicks import UNKNOWN, add_click_disk, update_by_prediction
from ..modeling import InterFormer
from .click_sampler import ClickSimConfig, choose_click, first_click, sample_num_clicks
from .losses import LossConfig, segmentation_losses

Pyramid = list[torch.Tensor]


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN or infinite: the step is not taken, so the weights stay finite."""


def nonfinite_gradients(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or an infinity (an empty list when all are finite)."""
    return [name for name, p in model.named_parameters() if p.grad is not None and not bool(p.grad.isfinite().all())]


def check_finite_step(sums: dict[str, float], model: nn.Module) -> None:
    """Raise TrainingDiverged before the optimiser step when a loss or a gradient is not finite: stepping would
    write NaN into every weight the optimiser touches, and every later iteration (and checkpoint) would carry it."""
    bad_losses = {k: v for k, v in sums.items() if not np.isfinite(v)}
    if bad_losses:
        raise TrainingDiverged("the loss is not finite (" + ", ".join(f"{k}={v}" for k, v in bad_losses.items()) + ")")
    bad_grads = nonfinite_gradients(model)
    if bad_grads:
        shown = ", ".join(bad_grads[:3]) + (" ..." if len(bad_grads) > 3 else "")
        raise TrainingDiverged(f"{len(bad_grads)} gradient(s) are not finite ({shown})")


class TrainForward(nn.Module):
    """The module Ray/DDP wraps: full forward (image) or neck + heads on given pyramids (frozen backbone)."""

    def __init__(self, model: InterFormer) -> None:
        super().__init__()
        self.model = model

    def forward(self, img: torch.Tensor | None, ref_label: torch.Tensor, pyramid: Pyramid | None = None
                ) -> dict[str, torch.Tensor]:
        if pyramid is None:
            return self.model.forward_train(img, ref_label)
        neck_out = self.model.neck(pyramid, ref_label)
        return {"logits": self.model.decode_head(neck_out), "aux_logits": self.model.auxiliary_head(neck_out)}


def predict_masks(model: InterFormer, pyramid: Pyramid, ref_label: np.ndarray) -> np.ndarray:
    """Argmax masks [B, H, W] (bool) at the reference-label resolution: logits bilinearly upsampled x4."""
    device = pyramid[0].device
    ref = torch.from_numpy(ref_label.astype(np.int64))[:, None].to(device)
    logits = model.decode(pyramid, ref)
    logits = F.interpolate(logits, size=ref_label.shape[-2:], mode="bilinear", align_corners=False)
    return (logits.argmax(dim=1) == 1).cpu().numpy()


def simulate_ref_labels(gt: np.ndarray, num_extra: int, predict: Callable[[np.ndarray], np.ndarray] | None,
                        rng: np.random.Generator, cfg: ClickSimConfig) -> tuple[np.ndarray, list[int]]:
    """Reference labels [B, H, W] (uint8) after the first click and `num_extra` simulated rounds, and the
    number of clicks placed per sample. `gt` [B, H, W] is the boolean object mask (ignore counts as
    background, as in the official click rule); `predict` maps reference labels to boolean masks."""
    ref = np.full(gt.shape, UNKNOWN, dtype=np.uint8)
    clicked: list[list[tuple[int, int]]] = [[] for _ in range(len(gt))]

    def stamp(b: int, click) -> None:
        if click is not None:
            ref[b] = add_click_disk(ref[b], click.row, click.col, click.positive, cfg.click_radius)
            clicked[b].append((click.row, click.col))

    for b in range(len(gt)):
        stamp(b, first_click(gt[b], rng))
    for _ in range(num_extra):
        if predict is None:
            raise ValueError("extra clicks need a predict function")
        pred = predict(ref)
        ref = update_by_prediction(ref, pred)
        for b in range(len(gt)):
            stamp(b, choose_click(pred[b], gt[b], rng, cfg.sfc_inner_k, clicked[b]))
    return ref, [len(c) for c in clicked]


def sample_losses(forward: nn.Module, model: InterFormer, img: torch.Tensor | None, label: torch.Tensor,
                  num_extra: int, rng: np.random.Generator, clicks_cfg: ClickSimConfig, loss_cfg: LossConfig,
                  frozen_backbone: bool = False, pyramid: Pyramid | None = None, freeze_bn: bool = False
                  ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Simulate clicks for one micro-batch and run the training forward; returns the losses (with grad) and
    the number of clicks per sample.

    `forward` is `TrainForward(model)`, possibly DDP-wrapped. With `frozen_backbone` the pyramid is computed
    once without gradients (or passed in, e.g. read from a feature table) and only neck + heads learn.
    With `freeze_bn`, and always for a single sample (no batch statistics exist for the 1x1 pooled branch),
    the heads' BatchNorm layers normalise with their running statistics and do not update them.
    """
    if img is None and pyramid is None:
        raise ValueError("a training step needs images or pyramids")
    gt = (label == 1).cpu().numpy()
    model.eval()
    with torch.no_grad():
        if pyramid is None and (frozen_backbone or num_extra > 0):
            pyramid = model.backbone(img)
        predict = (lambda r: predict_masks(model, pyramid, r)) if pyramid is not None else None
        ref, n_clicks = simulate_ref_labels(gt, num_extra, predict, rng, clicks_cfg)
    model.train()
    if frozen_backbone:
        model.backbone.eval()
    if freeze_bn or len(label) == 1:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    if frozen_backbone:
        # torch 2.15 CPU segfaults in the GroupNorm backward for a channels-last input that needs no grad
        # (the backbone returns channels-last maps); contiguous copies avoid it
        pyramid = [p.contiguous() for p in pyramid]
    ref_t = torch.from_numpy(ref.astype(np.int64))[:, None].to(label.device)
    out = forward(img, ref_t, pyramid if frozen_backbone else None)
    return segmentation_losses(out["logits"], out.get("aux_logits"), label, loss_cfg), n_clicks


def training_step(forward: nn.Module, model: InterFormer, optimizer: torch.optim.Optimizer,
                  micro_batches: list[tuple[torch.Tensor | None, torch.Tensor, Pyramid | None]],
                  rng: np.random.Generator, clicks_cfg: ClickSimConfig, loss_cfg: LossConfig,
                  frozen_backbone: bool = False, freeze_bn: bool = False) -> dict[str, float]:
    """One iteration: a shared k, every micro-batch (img, label, pyramid) forward/backward with its loss
    weighted by its share of the samples (gradients accumulate), one optimiser step; returns scalar metrics.
    TrainingDiverged, with no step taken, when the loss or a gradient is NaN or infinite."""
    num_extra = sample_num_clicks(rng, clicks_cfg.max_extra_clicks, clicks_cfg.click_decay)
    total = sum(len(label) for _, label, _ in micro_batches)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    clicks: list[int] = []
    for i, (img, label, pyramid) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync_off = getattr(forward, "no_sync", None)
        with (sync_off() if sync_off is not None and not last else contextlib.nullcontext()):
            losses, n_clicks = sample_losses(forward, model, img, label, num_extra, rng, clicks_cfg, loss_cfg,
                                             frozen_backbone, pyramid, freeze_bn)
            share = len(label) / total
            (losses["loss"] * share).backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * share
        clicks += n_clicks
    check_finite_step(sums, model)
    optimizer.step()
    sums["extra_clicks"] = float(num_extra)
    sums["clicks_per_sample"] = float(np.mean(clicks))
    return sums
