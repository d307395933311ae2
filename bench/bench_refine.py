"""Corrective clicks to reach an IoU target when the annotator starts from a pre-annotation vs from nothing.

Per object of GrabCut / Berkeley (../shared/data): a coarse prompt mask (the ground truth dilated by
`--dilate` pixels, as the pre-annotation tests prompt with), the pre-annotation jobs/preannotate.py makes
from it (RITM's robot user against the coarse mask, `--pre-clicks` at most, best mask kept), then RITM's
robot user against the ground truth until IoU >= `--target` (cap `--max-clicks`), three ways:

  scratch      a fresh session (the backend before issue 12: a correction throws the pre-annotation away)
  from-mask    `predictor.session(feats, initial_mask=pre_annotation)` (the backend, for regions without
               clicks: box prompts, regions drawn or edited by hand, another model's)
  from-clicks  `predictor.session(feats, initial_clicks=pre_clicks)`: the pre-annotation's own clicks, then
               the corrections (the backend, for regions jobs/preannotate.py wrote: their meta keeps the clicks)

Reported per dataset: mean corrective clicks (NoC@target, capped; 0 when the pre-annotation already meets
the target), the share of objects reaching the target, and the pre-annotation's mean IoU. Use the trained
small model (bench/run_training_proof.sh) or an official checkpoint; random weights only check the script.

    python bench/bench_refine.py --checkpoint outputs/train-proof/run-2500/checkpoints/iter_0002500.pth \\
        --max-side 320 --out bench/results/refine.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, then the checkout

from interformer import PreprocessConfig  # noqa: E402
from pipeline.clicker import mark_clicked, new_not_clicked, ritm_next_click  # noqa: E402
from pipeline.datasets import berkeley, grabcut  # noqa: E402
from pipeline.encoding import EncoderSpec, build_predictor  # noqa: E402
from pipeline.metrics import iou  # noqa: E402
from pipeline.preannotation import ClickPolicy, simulate_clicks  # noqa: E402
from results_io import begin, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"GrabCut": grabcut, "Berkeley": berkeley}
MODES = ("scratch", "from-mask", "from-clicks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="*", metavar="DATASET",
                   help=f"any of {', '.join(DATASETS)} (default: all)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder holding the datasets")
    p.add_argument("--checkpoint", default=None, help="model weights (default: random init of --variant)")
    p.add_argument("--variant", default=None, help="variant for random init, or checked against the checkpoint")
    p.add_argument("--max-side", type=int, default=None, help="resize images so the longest side is at most this")
    p.add_argument("--dilate", type=int, default=5, help="coarse prompt: ground truth dilated by this many pixels")
    p.add_argument("--pre-clicks", type=int, default=10, help="pre-annotation: clicks at most (jobs/preannotate.py)")
    p.add_argument("--pre-target", type=float, default=0.9, help="pre-annotation: stop at this IoU vs the coarse mask")
    p.add_argument("--target", type=float, default=0.9, help="corrections: IoU vs ground truth to reach")
    p.add_argument("--max-clicks", type=int, default=20, help="corrections: clicks at most")
    p.add_argument("--limit", type=int, default=None, help="objects per dataset (default: all)")
    p.add_argument("--out", type=Path, default=None, help="raw results file: per-object records and the summary (default: bench/results/bench_refine-UTC.json)")
    args = p.parse_args(argv)
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown:  # checked here: argparse's choices reject an empty nargs="*" list on Python 3.11
        p.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    args.datasets = args.datasets or list(DATASETS)
    return args


def coarse_prompt(gt: np.ndarray, pixels: int) -> np.ndarray:
    """The object's mask grown by `pixels` (an annotator's or detector's rough outline)."""
    k = 2 * pixels + 1
    return cv2.dilate((gt == 1).astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0


def corrective_clicks(session, gt: np.ndarray, start: np.ndarray | None, target: float,
                      max_clicks: int) -> tuple[int, bool]:
    """RITM's robot user against `gt` from the session's current state: (clicks until IoU >= target, capped
    at max_clicks; whether the target was reached)."""
    pred = np.zeros(gt.shape, dtype=bool) if start is None else start
    if start is not None and iou(gt, pred) >= target:
        return 0, True
    not_clicked = new_not_clicked(gt.shape)
    for n in range(1, max_clicks + 1):
        click = ritm_next_click(gt, pred, not_clicked)
        mark_clicked(not_clicked, click)
        pred = session.add_click(click.row, click.col, click.positive).mask
        if iou(gt, pred) >= target:
            return n, True
    return max_clicks, False


def run_object(predictor, image: np.ndarray, gt: np.ndarray, args: argparse.Namespace) -> dict:
    feats = predictor.encode(image)
    coarse = coarse_prompt(gt, args.dilate)
    pre_session = predictor.session(feats)
    pre_clicks, pre_result, _ = simulate_clicks(pre_session, coarse, ClickPolicy(args.pre_target, args.pre_clicks))
    pre = pre_result.mask
    record = {"pre_iou": iou(gt, pre), "coarse_iou": iou(gt, coarse), "pre_clicks": len(pre_clicks)}
    sessions = {"scratch": (predictor.session(feats), None), "from-mask": (predictor.session(feats, initial_mask=pre), pre),
                "from-clicks": (predictor.session(feats, initial_clicks=pre_clicks), pre)}
    for mode, (session, start) in sessions.items():
        record[mode], record[f"{mode}_reached"] = corrective_clicks(session, gt, start, args.target, args.max_clicks)
    return record


def summarise(records: list[dict]) -> dict:
    out = {"objects": len(records), "pre_iou": float(np.mean([r["pre_iou"] for r in records])),
           "coarse_iou": float(np.mean([r["coarse_iou"] for r in records]))}
    for mode in MODES:
        out[mode] = {"noc": float(np.mean([r[mode] for r in records])),
                     "success": float(np.mean([r[f"{mode}_reached"] for r in records]))}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = begin()
    spec = EncoderSpec(checkpoint=args.checkpoint, variant=args.variant if args.checkpoint else (args.variant or "small"),
                       preprocess=PreprocessConfig(max_side=args.max_side))
    predictor = build_predictor(spec, device="cpu")
    results: dict = {"config": {k: str(v) for k, v in vars(args).items()}, "datasets": {}}
    t0 = time.perf_counter()
    for name in args.datasets:
        refs = DATASETS[name](args.data / name)[: args.limit]
        records = []
        for i, ref in enumerate(refs, 1):
            sample = ref.load()
            records.append({"sample": ref.sample_id, **run_object(predictor, sample.image, sample.gt, args)})
            if i % 10 == 0 or i == len(refs):
                print(f"{name}: {i}/{len(refs)} objects ({time.perf_counter() - t0:.0f} s)", flush=True)
        results["datasets"][name] = {"summary": summarise(records), "records": records}
    print(f"\ncorrective clicks to IoU {args.target} (cap {args.max_clicks}); coarse prompt = gt dilated "
          f"{args.dilate} px; pre-annotation <= {args.pre_clicks} clicks")
    print(f"{'dataset':<10}{'N':>5}{'coarse IoU':>12}{'pre IoU':>9}" + "".join(f"{m:>14}" for m in MODES))
    for name, d in results["datasets"].items():
        s = d["summary"]
        print(f"{name:<10}{s['objects']:>5}{s['coarse_iou']:>12.3f}{s['pre_iou']:>9.3f}"
              + "".join(f"{s[m]['noc']:>8.2f} ({s[m]['success']:.0%})" for m in MODES))
    save("bench_refine", results, started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
