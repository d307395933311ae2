"""Simulated annotator ("robot user"): where the next click goes, given ground truth and prediction.

Two rule sets, both from `../shared/spec/evaluation-protocol.md`:

* `ritm_next_click` (§1.2) reproduces RITM's `Clicker._get_next_click`: error maps exclude the ignore label,
  a 1-pixel zero pad makes the image border count as outside, an exact Euclidean distance transform
  (OpenCV `DIST_L2`, `DIST_MASK_PRECISE`) is cropped back, already-clicked pixels are zeroed *after* the
  transform, the click is positive only if the false-negative maximum is strictly larger, and it lands
  on the first maximum in raster order. Deterministic.
* `interformer_next_click` (§1.9) reproduces InterFormer's `utils.click` at test time: error maps against
  `gt == 1` (ignore pixels count as background), clicked pixels removed *before* the transform, a random
  pixel among the maxima (seeded generator), and no click at all when both maxima are 0. The caller gives
  it ground truth and prediction on the padded network canvas.

Ground truth is an integer mask with 1 = object, 0 = background, -1 = ignore; predictions are boolean.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from interformer.clicks import Click  # (row, col, positive): the model's own click type

IGNORE_LABEL = -1
# InterFormer keeps pixels whose distance exceeds max / (1 + eps), eps = float32 machine epsilon
# (torch.finfo(torch.float).eps): a tolerance that, for exact distances, selects exactly the maxima.
_INTERFORMER_EPS = float(np.finfo(np.float32).eps)

__all__ = [
    "Click", "IGNORE_LABEL", "check_masks", "interformer_next_click", "mark_clicked", "new_not_clicked",
    "padded_distance", "ritm_error_maps", "ritm_next_click",
]


def check_masks(gt: np.ndarray, pred: np.ndarray) -> None:
    """Raise ValueError unless `gt` and `pred` are 2-D arrays of the same shape."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.ndim != 2:
        raise ValueError(f"ground truth must be a 2-D mask, got shape {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")


def padded_distance(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each True pixel to the nearest False pixel, the image outside counting as False.

    The mask is padded with one row/column of zeros on every side before the transform and the pad is
    cropped afterwards, so an error region touching the border is measured to the border (float32, H x W).
    """
    padded = np.pad(np.asarray(mask, dtype=np.uint8), ((1, 1), (1, 1)), mode="constant")
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist[1:-1, 1:-1]


def ritm_error_maps(gt: np.ndarray, pred: np.ndarray, ignore_label: int = IGNORE_LABEL) -> tuple[np.ndarray, np.ndarray]:
    """False-negative and false-positive maps of RITM: object is `gt == 1`, ignore pixels are in neither map."""
    check_masks(gt, pred)
    gt = np.asarray(gt)
    pred = np.asarray(pred, dtype=bool)
    obj = gt == 1
    valid = gt != ignore_label
    fn = obj & ~pred & valid
    fp = ~obj & pred & valid
    return fn, fp


def new_not_clicked(shape: tuple[int, int]) -> np.ndarray:
    """RITM's `not_clicked_map` at the start of a sample: all True."""
    return np.ones(shape, dtype=bool)


def mark_clicked(not_clicked: np.ndarray, click: Click) -> None:
    """Record a click in a `not_clicked` map in place (RITM's `add_click`)."""
    not_clicked[click.row, click.col] = False


def ritm_next_click(
    gt: np.ndarray,
    pred: np.ndarray,
    not_clicked: np.ndarray,
    ignore_label: int = IGNORE_LABEL,
) -> Click:
    """The click RITM's robot user makes next (spec §1.2), given ground truth, prediction and clicked pixels.

    When the prediction is perfect (both maxima 0) the click is negative at the first pixel whose (zeroed)
    distance equals 0, i.e. (0, 0), as in RITM's code.
    """
    fn, fp = ritm_error_maps(gt, pred, ignore_label)
    if not_clicked.shape != fn.shape:
        raise ValueError(f"not_clicked map shape {not_clicked.shape} differs from ground truth shape {fn.shape}")
    fn_dist = padded_distance(fn) * not_clicked
    fp_dist = padded_distance(fp) * not_clicked
    fn_max = fn_dist.max()
    fp_max = fp_dist.max()
    positive = bool(fn_max > fp_max)
    dist, peak = (fn_dist, fn_max) if positive else (fp_dist, fp_max)
    rows, cols = np.nonzero(dist == peak)
    return Click(int(rows[0]), int(cols[0]), positive)


def interformer_next_click(
    gt: np.ndarray,
    pred: np.ndarray,
    clicks: Sequence[Click],
    rng: np.random.Generator,
) -> Click | None:
    """The click InterFormer's test-time simulator makes next (spec §1.9), or None when there is no error left.

    `gt` and `pred` are on the padded canvas (gt padded with background). Pixels of earlier `clicks` are
    removed from the error maps before the distance transform; ties are broken uniformly at random with `rng`.
    """
    check_masks(gt, pred)
    obj = np.asarray(gt) == 1
    pred = np.asarray(pred, dtype=bool)
    clicked = np.zeros(obj.shape, dtype=bool)
    for c in clicks:
        clicked[c.row, c.col] = True
    fn = obj & ~pred & ~clicked
    fp = ~obj & pred & ~clicked
    fn_dist = padded_distance(fn)
    fp_dist = padded_distance(fp)
    fn_max = float(fn_dist.max())
    fp_max = float(fp_dist.max())
    if fn_max == 0.0 and fp_max == 0.0:
        return None
    positive = fn_max > fp_max
    dist, peak = (fn_dist, fn_max) if positive else (fp_dist, fp_max)
    candidates = np.argwhere(dist.astype(np.float64) > peak / (1.0 + _INTERFORMER_EPS))
    row, col = candidates[int(rng.integers(len(candidates)))]
    return Click(int(row), int(col), positive)
