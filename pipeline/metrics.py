"""Interactive-segmentation metrics (spec §1.4-§1.6): IoU with ignore, NoC, NoF, mIoU@k, seconds per click.

Per-sample inputs are IoU lists: element k-1 is the IoU after click k. All functions are pure.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .clicker import IGNORE_LABEL, check_masks

MAX_CLICKS = 20


def iou(gt: np.ndarray, pred: np.ndarray, ignore_label: int = IGNORE_LABEL) -> float:
    """|pred ∧ obj ∧ valid| / |(pred ∨ obj) ∧ valid| with obj = gt == 1 and valid = gt != ignore (RITM `get_iou`).

    An empty union (no object, nothing predicted) is a perfect answer and gives 1.0 (RITM would give NaN;
    benchmark samples always contain an object).
    """
    check_masks(gt, pred)
    gt = np.asarray(gt)
    pred = np.asarray(pred, dtype=bool)
    obj = gt == 1
    valid = gt != ignore_label
    inter = np.count_nonzero(pred & obj & valid)
    union = np.count_nonzero((pred | obj) & valid)
    return 1.0 if union == 0 else inter / union


def noc(ious: Sequence[float], threshold: float, max_clicks: int = MAX_CLICKS) -> int:
    """Number of clicks to reach `threshold`: 1-based index of the first IoU >= threshold, else `max_clicks`.

    Compared in float32 like RITM (`compute_noc_metric` holds the IoUs in a float32 array).
    """
    arr = np.asarray(ious, dtype=np.float32)[:max_clicks]
    hits = np.nonzero(arr >= np.float32(threshold))[0]
    return int(hits[0]) + 1 if hits.size else max_clicks


def mean_noc(ious_lists: Sequence[Sequence[float]], threshold: float, max_clicks: int = MAX_CLICKS) -> float:
    """Dataset NoC@threshold: the mean of the per-sample NoC."""
    _require_samples(ious_lists)
    return float(np.mean([noc(x, threshold, max_clicks) for x in ious_lists]))


def nof_ritm(ious_lists: Sequence[Sequence[float]], threshold: float, max_clicks: int = MAX_CLICKS) -> int:
    """NoF as RITM prints it (">=20@t"): samples whose NoC equals `max_clicks`.

    This also counts samples that first reach the threshold exactly at the last click.
    """
    return int(sum(noc(x, threshold, max_clicks) == max_clicks for x in ious_lists))


def success_ratio(ious_lists: Sequence[Sequence[float]], threshold: float, max_clicks: int = MAX_CLICKS) -> float:
    """InterFormer's success ratio: fraction of samples whose best IoU within `max_clicks` is >= threshold."""
    _require_samples(ious_lists)
    return float(np.mean([max(x[:max_clicks]) >= threshold for x in ious_lists]))


def miou_at(ious_lists: Sequence[Sequence[float]], k: int) -> float:
    """mIoU@k: mean over samples of the IoU after click k (1-based); every list must have at least k values."""
    _require_samples(ious_lists)
    if k < 1:
        raise ValueError(f"k is 1-based, got {k}")
    short = sum(len(x) < k for x in ious_lists)
    if short:
        raise ValueError(f"{short} samples have fewer than {k} clicks; mIoU@k needs runs of at least k clicks")
    return float(np.mean([x[k - 1] for x in ious_lists]))


def miou_curve(ious_lists: Sequence[Sequence[float]], max_clicks: int = MAX_CLICKS) -> list[float]:
    """[mIoU@1, ..., mIoU@max_clicks]."""
    return [miou_at(ious_lists, k) for k in range(1, max_clicks + 1)]


def paired_difference_interval(baseline: Sequence[float], candidate: Sequence[float], level: float = 0.95,
                               resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of mean(candidate - baseline) over paired samples (e.g. per-sample NoC of a
    fast engine and of fp32 on the same images): resampling images, not clicks, says whether a dataset's
    difference is the candidate's or the sample's. Seeded, so a report reads the same every time."""
    a, b = np.asarray(baseline, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be two equal-length lists, got {a.shape} and {b.shape}")
    _require_samples(a)
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level} and {resamples}")
    diff = b - a
    picks = np.random.default_rng(seed).integers(0, diff.size, size=(resamples, diff.size))
    means = diff[picks].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Timing:
    """Seconds per image for encoding and per click for interaction (spec §1.6, our split), plus RITM's SPC.

    encode_s_per_image: image encoder (or feature-table read) time, amortised over images.
    interact_s_per_click: model time per click (the `add_click` call), encoder excluded.
    total_s_per_click: RITM-style SPC, the whole per-sample wall time (reading, clicker, IoU, model) / clicks.
    """

    encode_s_per_image: float
    interact_s_per_click: float
    total_s_per_click: float


def timing(
    encode_s: Sequence[float], click_s: Sequence[Sequence[float | None]], total_s: Sequence[float]
) -> Timing:
    """Aggregate per-sample timings: encode seconds, per-click seconds (None: no model call), whole-sample seconds."""
    _require_samples(encode_s)
    timed = [t for per_sample in click_s for t in per_sample if t is not None]
    if not timed:
        raise ValueError("no clicks were timed")
    return Timing(
        encode_s_per_image=float(np.mean(encode_s)),
        interact_s_per_click=float(sum(timed) / len(timed)),
        total_s_per_click=float(sum(total_s) / len(timed)),
    )


@dataclass(frozen=True)
class Summary:
    """One run on one dataset. nof_* are RITM's ">=20" counts; success_* are InterFormer's ratios."""

    samples: int
    noc85: float
    noc90: float
    nof85: int
    nof90: int
    success85: float
    success90: float
    miou: tuple[float, ...]
    timing: Timing | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    ious_lists: Sequence[Sequence[float]],
    timing_: Timing | None = None,
    max_clicks: int = MAX_CLICKS,
) -> Summary:
    """All reported metrics of one run on one dataset (runs must have `max_clicks` clicks per sample)."""
    return Summary(
        samples=len(ious_lists),
        noc85=mean_noc(ious_lists, 0.85, max_clicks),
        noc90=mean_noc(ious_lists, 0.90, max_clicks),
        nof85=nof_ritm(ious_lists, 0.85, max_clicks),
        nof90=nof_ritm(ious_lists, 0.90, max_clicks),
        success85=success_ratio(ious_lists, 0.85, max_clicks),
        success90=success_ratio(ious_lists, 0.90, max_clicks),
        miou=tuple(miou_curve(ious_lists, max_clicks)),
        timing=timing_,
    )


def _require_samples(values: Sequence) -> None:
    if len(values) == 0:
        raise ValueError("no samples to aggregate")
