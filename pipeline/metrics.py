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


NOC_DTYPES = {"ritm": np.float32, "interformer": np.float64}


def noc_dtype(protocol: str) -> type:
    """The float type NoC compares IoUs in under `protocol`: RITM's `compute_noc_metric` holds them in a
    float32 array, InterFormer's clicktest in a float64 one (mmseg's IoUs)."""
    try:
        return NOC_DTYPES[protocol]
    except KeyError:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {tuple(NOC_DTYPES)}") from None


def noc(ious: Sequence[float], threshold: float, max_clicks: int = MAX_CLICKS, protocol: str = "ritm") -> int:
    """Number of clicks to reach `threshold`: 1-based index of the first IoU >= threshold, else `max_clicks`.

    Compared in the protocol's precision (`noc_dtype`): float32 for RITM, float64 for InterFormer, so an IoU a
    float32 rounding below the threshold reaches it under RITM only.
    """
    dtype = noc_dtype(protocol)
    arr = np.asarray(ious, dtype=dtype)[:max_clicks]
    hits = np.nonzero(arr >= dtype(threshold))[0]
    return int(hits[0]) + 1 if hits.size else max_clicks


def mean_noc(ious_lists: Sequence[Sequence[float]], threshold: float, max_clicks: int = MAX_CLICKS,
             protocol: str = "ritm") -> float:
    """Dataset NoC@threshold: the mean of the per-sample NoC."""
    _require_samples(ious_lists)
    return float(np.mean([noc(x, threshold, max_clicks, protocol) for x in ious_lists]))


def nof_ritm(ious_lists: Sequence[Sequence[float]], threshold: float, max_clicks: int = MAX_CLICKS,
             protocol: str = "ritm") -> int:
    """NoF as RITM prints it (">=20@t"): samples whose NoC equals `max_clicks`.

    This also counts samples that first reach the threshold exactly at the last click.
    """
    return int(sum(noc(x, threshold, max_clicks, protocol) == max_clicks for x in ious_lists))


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


SPC_STOP_IOU = 0.90


def ritm_clicks_made(ious: Sequence[float], stop_iou: float = SPC_STOP_IOU) -> int:
    """Clicks RITM's evaluation makes on a sample with early stopping at `stop_iou` (its `evaluate_sample`
    with max_iou_thr 0.90): up to and including the first click whose IoU >= stop_iou, else all of them.

    RITM stops on the float64 IoU, so this compares in float64; NoC compares in float32 (`noc`) and can be
    one click lower for an IoU a float32 rounding below the threshold."""
    for k, v in enumerate(ious, start=1):
        if float(v) >= stop_iou:
            return k
    return len(ious)


def ritm_spc_share(load_s: float, encode_s: float, click_s: Sequence[float | None], ious: Sequence[float],
                   stop_iou: float = SPC_STOP_IOU) -> tuple[float, int]:
    """(seconds, clicks) that one sample adds to RITM's SPC: its reading, its encoding and its model calls up
    to the click that reaches `stop_iou` (all of them when none does), and that number of clicks
    (`ritm_clicks_made`). A click without a model call (None) adds no seconds but counts as a click."""
    k = ritm_clicks_made(ious, stop_iou)
    return load_s + encode_s + sum(t for t in click_s[:k] if t is not None), k


@dataclass(frozen=True)
class Timing:
    """Seconds per image for encoding and per click for interaction (spec §1.6, our split), plus RITM's SPC.

    encode_s_per_image: image encoder (or feature-table read) time, amortised over images.
    interact_s_per_click: model time per click (the `add_click` call), encoder excluded.
    spc: RITM's SPC (spec §1.6): the time of the run RITM makes, early-stopped at IoU 0.90 (reading, encoding
        and the model calls of the clicks made), divided by the clicks made (`ritm_spc_share`).
    run_s_per_click: the whole wall time of the samples as run here (every click up to the cap, with the
        clicker and the IoU) divided by the clicks run.
    """

    encode_s_per_image: float
    interact_s_per_click: float
    spc: float
    run_s_per_click: float


def timing(
    encode_s: Sequence[float],
    click_s: Sequence[Sequence[float | None]],
    total_s: Sequence[float],
    load_s: Sequence[float],
    ious: Sequence[Sequence[float]],
    stop_iou: float = SPC_STOP_IOU,
) -> Timing:
    """Aggregate per-sample timings: encode seconds, per-click seconds (None: no model call), whole-sample
    seconds, reading seconds and the IoU after each click (which says where RITM would have stopped)."""
    _require_samples(encode_s)
    if not len(encode_s) == len(click_s) == len(total_s) == len(load_s) == len(ious):
        raise ValueError("timing needs the same number of samples in every list")
    timed = [t for per_sample in click_s for t in per_sample if t is not None]
    if not timed:
        raise ValueError("no clicks were timed")
    shares = [ritm_spc_share(*parts, stop_iou) for parts in zip(load_s, encode_s, click_s, ious)]
    return Timing(
        encode_s_per_image=float(np.mean(encode_s)),
        interact_s_per_click=float(sum(timed) / len(timed)),
        spc=float(sum(s for s, _ in shares) / sum(k for _, k in shares)),
        run_s_per_click=float(sum(total_s) / sum(len(c) for c in click_s)),
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
    protocol: str = "ritm",
) -> Summary:
    """All reported metrics of one run on one dataset (runs must have `max_clicks` clicks per sample); NoC
    and NoF compare in the `protocol`'s precision (`noc_dtype`)."""
    return Summary(
        samples=len(ious_lists),
        noc85=mean_noc(ious_lists, 0.85, max_clicks, protocol),
        noc90=mean_noc(ious_lists, 0.90, max_clicks, protocol),
        nof85=nof_ritm(ious_lists, 0.85, max_clicks, protocol),
        nof90=nof_ritm(ious_lists, 0.90, max_clicks, protocol),
        success85=success_ratio(ious_lists, 0.85, max_clicks),
        success90=success_ratio(ious_lists, 0.90, max_clicks),
        miou=tuple(miou_curve(ious_lists, max_clicks)),
        timing=timing_,
    )


def _require_samples(values: Sequence) -> None:
    if len(values) == 0:
        raise ValueError("no samples to aggregate")
