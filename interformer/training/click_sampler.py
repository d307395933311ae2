"""Training-time click simulation (spec §6, official `utils/click.py` and `ClickSegmentor.interact_train`).

Pure numpy functions; randomness comes from an explicit `np.random.Generator` so that a resumed run
draws the same clicks as an uninterrupted one.

* `choose_click`: error regions FN = ~pred & gt and FP = pred & ~gt (already-clicked pixels excluded),
  exact L2 distance transforms with the image border counted as boundary; the larger region (by maximum
  distance; a tie goes negative) gets the click, at a uniformly random pixel whose distance exceeds
  max / (sfc_inner_k + eps). sfc_inner_k = 1.0 is the most interior point, 1.7 is the training rule.
* `first_click`: the first click is positive, at a most interior pixel of the object (pred = all background).
* `sample_num_clicks`: the number of extra simulated clicks k in 0..max with P(k) ∝ gamma^k.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import cv2
import numpy as np

from ..cli_types import FRACTION, POSITIVE, integer

FLOAT_EPS = float(np.finfo(np.float32).eps)


class SimClick(NamedTuple):
    row: int
    col: int
    positive: bool


@dataclass(frozen=True)
class ClickSimConfig:
    """Iterative click simulation during training (official train_cfg)."""

    max_extra_clicks: int = field(default=20, metadata={"range": integer(0),
        "help": "simulated extra clicks k are drawn from 0..this"})
    click_decay: float = field(default=0.6, metadata={"range": FRACTION,
        "help": "P(k) is proportional to click_decay ** k"})
    sfc_inner_k: float = field(default=1.7, metadata={"range": POSITIVE,
        "help": "extra clicks land where the error-region distance exceeds max / sfc_inner_k (first click: 1.0)"})
    click_radius: float = field(default=5.0, metadata={"range": POSITIVE, "help": "click disk radius in pixels"})


def num_clicks_distribution(max_num_clicks: int, gamma: float) -> np.ndarray:
    """Probabilities of k = 0..max_num_clicks, P(k) ∝ gamma ** k."""
    if max_num_clicks < 0:
        raise ValueError(f"max_num_clicks must be >= 0, got {max_num_clicks}")
    if not 0.0 < gamma:
        raise ValueError(f"gamma must be positive, got {gamma}")
    probs = gamma ** np.arange(max_num_clicks + 1, dtype=np.float64)
    return probs / probs.sum()


def sample_num_clicks(rng: np.random.Generator, max_num_clicks: int = 20, gamma: float = 0.6) -> int:
    """Draw k, the number of simulated extra clicks for one training iteration (shared by the batch)."""
    probs = num_clicks_distribution(max_num_clicks, gamma)
    return int(rng.choice(len(probs), p=probs))


def border_distance(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each mask pixel to the nearest non-mask pixel, the outside of the image
    counting as non-mask (zero padding). float32, 0 outside the mask."""
    padded = np.pad(mask.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def choose_click(
    pred: np.ndarray,
    gt: np.ndarray,
    rng: np.random.Generator,
    sfc_inner_k: float = 1.0,
    clicked: Iterable[tuple[int, int]] = (),
) -> SimClick | None:
    """Next click for a boolean prediction `pred` and boolean object mask `gt` (both H x W); None when
    there is no error left. `clicked` lists (row, col) of earlier clicks, which are never clicked again."""
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be equal 2-D shapes")
    if sfc_inner_k < 1.0:
        raise ValueError(f"sfc_inner_k must be >= 1.0, got {sfc_inner_k}")
    pred = pred.astype(bool)
    gt = gt.astype(bool)
    free = np.ones_like(gt)
    for r, c in clicked:
        free[r, c] = False
    fn_dist = border_distance(~pred & gt & free)
    fp_dist = border_distance(pred & ~gt & free)
    fn_max, fp_max = float(fn_dist.max()), float(fp_dist.max())
    if fn_max == 0.0 and fp_max == 0.0:
        return None
    positive = fn_max > fp_max
    dist, dmax = (fn_dist, fn_max) if positive else (fp_dist, fp_max)
    candidates = np.argwhere(dist > dmax / (sfc_inner_k + FLOAT_EPS))
    if len(candidates) == 0:
        return None
    r, c = candidates[rng.integers(len(candidates))]
    return SimClick(int(r), int(c), bool(positive))


def first_click(gt: np.ndarray, rng: np.random.Generator) -> SimClick | None:
    """The first training click: positive, at a random most-interior pixel of `gt`; None for an empty object."""
    return choose_click(np.zeros_like(gt, dtype=bool), gt, rng, sfc_inner_k=1.0)
