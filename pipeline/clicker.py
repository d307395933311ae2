"""Simulated annotator ("robot user"): where the next click goes, given ground truth and prediction.

Two rule sets, both from `../shared/spec/evaluation-protocol.md`:

* `ritm_next_click` (§1.2) reproduces RITM's `Clicker._get_next_click`: error maps exclude the ignore label,
  a 1-pixel zero pad makes the image border count as outside, the Euclidean distance transform is cropped
  back, already-clicked pixels are zeroed *after* the transform, the click is positive only if the
  false-negative maximum is strictly larger, and it lands on the first maximum in raster order.
* `interformer_next_click` (§1.9) reproduces InterFormer's `utils.click` at test time: error maps against
  `gt == 1` (ignore pixels count as background), clicked pixels removed *before* the transform, a random
  pixel among the maxima (seeded generator), and no click at all when both maxima are 0. The caller gives
  it ground truth and prediction on the padded network canvas.

Both are deterministic functions of their inputs because the maxima are decided on exact distances
(`exact_maxima`): OpenCV's float32 transform (`DIST_MASK_PRECISE`) finds the candidates fast, but two pixels
at the same true distance can come out one unit in the last place apart depending on where the buffer
happens to sit in memory, which made "the first maximum" change between runs of the same input; the
candidates' distances are recomputed exactly (scipy's integer-exact transform on the crop that holds them)
before the comparison and the tie-break.

Ground truth is an integer mask with 1 = object, 0 = background, -1 = ignore; predictions are boolean.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from scipy.ndimage import distance_transform_edt

from interformer.clicks import Click  # (row, col, positive): the model's own click type

IGNORE_LABEL = -1
# Candidates for the maximum: OpenCV's float32 distances within this relative margin of its maximum. Its
# error is a few float32 units (~1e-7 relative), and distinct exact distances near the maximum D differ by
# at least 1 / (2 D) (they are square roots of distinct integers), so the margin keeps every true maximum
# and the exact recomputation drops the rest.
_CANDIDATE_MARGIN = 1e-4
# Up to this distance a float32 distance a few units off still squares to within 0.1 of its true integer
# square (d² <= 2^20; relative error ~1e-7 each way), so rounding the square recovers it exactly; beyond it
# the candidates' distances are recomputed by scipy's exact transform on the crop that holds them.
_EXACT_BY_ROUNDING = 1024.0

__all__ = [
    "Click", "IGNORE_LABEL", "check_masks", "exact_maxima", "interformer_next_click", "mark_clicked",
    "new_not_clicked", "padded_distance", "ritm_error_maps", "ritm_next_click",
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
    """Euclidean distance of each True pixel to the nearest False pixel, the image outside counting as False
    (float32, H x W; OpenCV's `DIST_MASK_PRECISE`, exact up to float32 rounding, see `exact_maxima`).

    The mask is padded with one row/column of zeros on every side before the transform and the pad is
    cropped afterwards, so an error region touching the border is measured to the border.
    """
    padded = np.pad(np.asarray(mask, dtype=np.uint8), ((1, 1), (1, 1)), mode="constant")
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist[1:-1, 1:-1]


def exact_maxima(mask: np.ndarray, keep: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """The maximum of `padded_distance(mask)` (times `keep`, when given) computed exactly, and every pixel
    that attains it as (row, col) rows in raster order. An all-False mask has maximum 0 at every kept pixel.

    Exact means float64 square roots of the integer squared distances, so equal true distances compare
    equal: the result depends on the mask alone, never on float32 rounding or memory layout.
    """
    mask = np.asarray(mask, dtype=bool)
    approx = padded_distance(mask)
    if keep is not None:
        approx = approx * keep
    top = float(approx.max()) if approx.size else 0.0
    if top == 0.0:
        return 0.0, np.argwhere(approx == 0)
    near = np.argwhere(approx >= top * (1.0 - _CANDIDATE_MARGIN))
    if top <= _EXACT_BY_ROUNDING:
        values = np.sqrt(np.rint(approx[near[:, 0], near[:, 1]].astype(np.float64) ** 2))
        peak = float(values.max())
        return peak, near[values == peak]
    # The nearest zero of a candidate lies within its distance (< top * (1 + margin)): a crop of the padded
    # mask that reaches that far around the candidates holds it, so the crop's transform is exact there.
    reach = int(np.ceil(top * (1.0 + _CANDIDATE_MARGIN))) + 1
    padded = np.pad(mask, 1)
    r0, c0 = np.maximum(near.min(axis=0) + 1 - reach, 0)
    r1, c1 = np.minimum(near.max(axis=0) + 2 + reach, padded.shape)
    exact = distance_transform_edt(padded[r0:r1, c0:c1])
    values = exact[near[:, 0] + 1 - r0, near[:, 1] + 1 - c0]
    peak = float(values.max())
    return peak, near[values == peak]


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
    fn_max, fn_at = exact_maxima(fn, not_clicked)
    fp_max, fp_at = exact_maxima(fp, not_clicked)
    positive = fn_max > fp_max
    row, col = (fn_at if positive else fp_at)[0]
    return Click(int(row), int(col), positive)


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
    fn_max, fn_at = exact_maxima(fn)
    fp_max, fp_at = exact_maxima(fp)
    if fn_max == 0.0 and fp_max == 0.0:
        return None
    positive = fn_max > fp_max
    candidates = fn_at if positive else fp_at
    row, col = candidates[int(rng.integers(len(candidates)))]
    return Click(int(row), int(col), positive)
