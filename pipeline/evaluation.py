"""The interaction loop of one evaluation sample, and the per-sample result records.

A segmenter is anything with `start(image, image_id=None, allow_padding=False) -> session`, where
`session.add_click(row, col, positive)` returns a result with a boolean `.mask` at image size, optionally
`.prob` (foreground probability) and `.padded_mask` (prediction on the padded network canvas). For the
InterFormer protocol the session is opened with `allow_padding=True` (it then takes clicks anywhere on the
padded canvas), and has a `canvas_size` (Hp, Wp) and `repredict()` (the prediction again from the current
state, no new click). `pipeline.baselines.GrabCutBaseline` and the model adapter in `pipeline.segmenters`
both qualify.

Protocols (spec §1.3 and §1.9); both always run `max_clicks` clicks so the mIoU curve is complete
(NoC is identical to RITM's early-stopped run because the clicks are deterministic):

* "ritm": RITM's clicker on the image; prediction = prob > pred_thr (0.49) when the result carries a
  probability map, else its mask; IoU on the image with the ignore label excluded.
* "interformer": InterFormer's clicker on the padded canvas (gt padded with background), prediction =
  `padded_mask` (argmax), IoU on the canvas with the ignore label excluded; a random tie-break seeded per
  sample; every step runs the segmenter as clicktest does: a click the simulator puts in the padding (a
  false positive there) is given to the session like any other (and listed, 1-based, in
  `extra["outside_clicks"]`), and when there is no error left no click is added but the prediction is
  made again from the current state (`repredict`; its IoU may change).
"""
from __future__ import annotations

import io
import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .clicker import Click, interformer_next_click, mark_clicked, new_not_clicked, ritm_next_click
from .datasets import Sample, SampleRef
from .metrics import MAX_CLICKS, iou

PROTOCOLS = ("ritm", "interformer")
# The InterFormer protocol's semantics changed on 4 Dec 2026 (clicks in the padding applied, a forward pass at
# steps without a click, NoC in float64, as clicktest): a results folder of the older loop must not be resumed.
INTERFORMER_PROTOCOL_REVISION = 2


@dataclass(frozen=True)
class EvalConfig:
    """protocol: "ritm" or "interformer"; max_clicks: clicks per sample; pred_thr: RITM's probability
    threshold (used when results carry `.prob`); seed: InterFormer tie-break seed (mixed with the sample key)."""

    protocol: str = "ritm"
    max_clicks: int = MAX_CLICKS
    pred_thr: float = 0.49
    seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {PROTOCOLS}")
        if self.max_clicks < 1:
            raise ValueError(f"max_clicks must be >= 1, got {self.max_clicks}")

    def to_dict(self) -> dict[str, Any]:
        """The settings a run records (run.json); the InterFormer protocol adds its revision, so a folder its
        older loop wrote is a different run (RITM-protocol folders keep their settings)."""
        d = asdict(self)
        if self.protocol == "interformer":
            d["protocol_revision"] = INTERFORMER_PROTOCOL_REVISION
        return d


@dataclass
class SampleResult:
    """Everything measured on one sample.

    ious[k-1]: IoU after click k. clicks[k-1]: [row, col, positive] of click k, or None when the InterFormer
    simulator had nothing left to click. extra: protocol notes (InterFormer: "outside_clicks", the clicks in
    the padding). Seconds: load_s (read image and mask), encode_s (`start`), click_s[k-1] (the model call of
    step k: `add_click`, or `repredict` when there was no click; None when no call was made), total_s (the
    whole sample with all its clicks: reading, encoding, clicker, IoU and model). RITM's SPC is computed from
    load_s, encode_s and click_s up to the click reaching IoU 0.90 (`pipeline.metrics.ritm_spc_share`).
    """

    dataset: str
    sample_id: str
    image_id: str
    protocol: str
    height: int
    width: int
    ious: list[float]
    clicks: list[list | None]
    load_s: float
    encode_s: float
    click_s: list[float | None]
    total_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.dataset, self.sample_id)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleResult":
        return cls(**d)


def sample_rng(seed: int, dataset: str, sample_id: str) -> np.random.Generator:
    """A generator that depends only on the seed and the sample, not on which worker runs it or when."""
    return np.random.default_rng([seed, zlib.crc32(f"{dataset}/{sample_id}".encode())])


def pad_to(mask: np.ndarray, size: tuple[int, int], value: int = 0) -> np.ndarray:
    """Pad a 2-D mask bottom/right to `size` with `value` (InterFormer pads ground truth with background)."""
    h, w = mask.shape
    hp, wp = size
    if hp < h or wp < w:
        raise ValueError(f"canvas {size} is smaller than the mask {mask.shape}")
    return np.pad(mask, ((0, hp - h), (0, wp - w)), mode="constant", constant_values=value)


def check_has_object(sample: Sample) -> None:
    """Raise ValueError naming the sample when its ground truth has no object pixel (gt == 1)."""
    if not np.any(np.asarray(sample.gt) == 1):
        raise ValueError(f"sample {sample.sample_id!r} of dataset {sample.dataset!r} has no object pixel (its ground "
                         f"truth is empty or all ignore): it cannot be evaluated; remove it from the dataset")


Clock = Callable[[], float]


def evaluate_sample(segmenter: Any, sample: Sample, config: EvalConfig = EvalConfig(), load_s: float = 0.0,
                    clock: Clock = time.perf_counter) -> SampleResult:
    """Run `config.max_clicks` simulated clicks on one sample and record IoU, clicks and timings (seconds of
    `clock`, which tests replace to give the segmenter known costs).

    A sample without an object pixel (empty, or all ignore) is refused with a ValueError: its IoU would be a
    perfect 1.0 at every click (NoC 1), which would flatter the dataset's averages."""
    check_has_object(sample)
    t0 = clock()
    if config.protocol == "interformer":
        session = segmenter.start(sample.image, sample.image_id, allow_padding=True)
    else:
        session = segmenter.start(sample.image, sample.image_id)
    encode_s = clock() - t0
    if config.protocol == "ritm":
        ious, clicks, click_s, extra = _ritm_loop(session, sample.gt, config, clock)
    else:
        ious, clicks, click_s, extra = _interformer_loop(session, sample, config, clock)
    total_s = load_s + clock() - t0
    h, w = sample.gt.shape
    return SampleResult(
        dataset=sample.dataset,
        sample_id=sample.sample_id,
        image_id=sample.image_id,
        protocol=config.protocol,
        height=int(h),
        width=int(w),
        ious=ious,
        clicks=clicks,
        load_s=load_s,
        encode_s=encode_s,
        click_s=click_s,
        total_s=total_s,
        extra=extra,
    )


def _ritm_loop(session: Any, gt: np.ndarray, config: EvalConfig,
               clock: Clock) -> tuple[list[float], list, list[float], dict]:
    pred = np.zeros(gt.shape, dtype=bool)
    not_clicked = new_not_clicked(gt.shape)
    ious, clicks, click_s = [], [], []
    for _ in range(config.max_clicks):
        click = ritm_next_click(gt, pred, not_clicked)
        mark_clicked(not_clicked, click)
        t = clock()
        res = session.add_click(click.row, click.col, click.positive)
        click_s.append(clock() - t)
        prob = getattr(res, "prob", None)
        pred = np.asarray(prob) > config.pred_thr if prob is not None else np.asarray(res.mask, dtype=bool)
        if pred.shape != gt.shape:
            raise ValueError(f"segmenter returned a {pred.shape} mask for a {gt.shape} image")
        ious.append(iou(gt, pred))
        clicks.append([click.row, click.col, click.positive])
    return ious, clicks, click_s, {}


def _interformer_loop(session: Any, sample: Sample, config: EvalConfig,
                      clock: Clock) -> tuple[list[float], list, list[float], dict]:
    canvas = tuple(int(v) for v in session.canvas_size)
    gt = pad_to(sample.gt, canvas, value=0)
    h, w = sample.gt.shape
    rng = sample_rng(config.seed, sample.dataset, sample.sample_id)
    pred = np.zeros(canvas, dtype=bool)
    made: list[Click] = []
    outside: list[int] = []
    ious, clicks, click_s = [], [], []
    for _ in range(config.max_clicks):
        click = interformer_next_click(gt, pred, made, rng)
        t = clock()
        if click is None:  # nothing to click: clicktest still runs the step on the updated reference map
            res = session.repredict()
        else:
            made.append(click)
            if click.row >= h or click.col >= w:  # a false positive in the padding, stamped there as clicktest does
                outside.append(len(ious) + 1)
            res = session.add_click(click.row, click.col, click.positive)
        click_s.append(clock() - t)
        pred = np.asarray(res.padded_mask, dtype=bool)
        if pred.shape != canvas:
            raise ValueError(f"segmenter returned a {pred.shape} padded mask for a {canvas} canvas")
        ious.append(iou(gt, pred))
        clicks.append(None if click is None else [click.row, click.col, click.positive])
    return ious, clicks, click_s, {"outside_clicks": outside} if outside else {}


def evaluate_ref(segmenter: Any, ref: SampleRef, config: EvalConfig = EvalConfig(),
                 clock: Clock = time.perf_counter) -> SampleResult:
    """Load a sample and evaluate it; the load time counts in the sample's total and in RITM's SPC (its
    elapsed time includes reading each sample)."""
    t = clock()
    sample = ref.load()
    return evaluate_sample(segmenter, sample, config, load_s=clock() - t, clock=clock)


def read_results(path: str | Path, repair: bool = False) -> list[SampleResult]:
    """Read a per-sample JSONL file. A last line without its newline (a run interrupted while writing) is
    dropped; with `repair` it is also cut from the file, so that appending continues on a clean line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    out = []
    good = 0
    for i, line in enumerate(io.BytesIO(data).readlines()):
        if not line.endswith(b"\n"):
            break
        if line.strip():
            try:
                out.append(SampleResult.from_dict(json.loads(line)))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}: line {i + 1} is not a valid result record ({e})") from None
        good += len(line)
    if repair and good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return out


def append_results(path: str | Path, results: Iterable[SampleResult]) -> None:
    """Append results to a JSONL file, one line each, flushed so an interrupted run keeps what it did."""
    with open(path, "a") as f:
        for r in results:
            f.write(r.to_json() + "\n")
            f.flush()


def pending(refs: Iterable[SampleRef], done: Iterable[tuple[str, str]]) -> Iterator[SampleRef]:
    """The refs whose (dataset, sample_id) key is not in `done`."""
    done = set(done)
    return (r for r in refs if r.key not in done)
