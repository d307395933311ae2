"""Quality gate of a fast click engine (and/or a compact feature dtype, and/or a faster encoder) against the exact
fp32 path (not a test): NoC and mIoU@k side by side.

Every sample is encoded once (and again by the candidate's encoder with --encode-engine / --encode-precision);
the exact engine (torch fp32) and the candidate engine then each run the whole
simulated-click evaluation (pipeline.evaluation, the same protocol as jobs/evaluate.py) on those features,
so each reacts to its own masks. Then the exact run's clicks are replayed through the candidate and the
masks compared click by click (IoU vs fp32). Gate (issue 11): the candidate's NoC@85 and NoC@90 no more than
0.05 above fp32's (dNoC = NoC(candidate) - NoC(fp32) <= 0.05; fewer clicks is no failure) and mean per-click IoU
vs fp32 >= 0.995, on every dataset. Each dNoC comes with a 95 % paired-bootstrap interval over the dataset's
images: an interval that straddles +-0.05 says the dataset is too small to tell the candidate from the sample.

    python bench/bench_engine_quality.py --checkpoint run/checkpoints/iter_0002500.pth --engine fast \
        --datasets GrabCut Berkeley --out bench/results/engine_quality.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import

import numpy as np  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, then the checkout

from results_io import begin, save  # noqa: E402
from interformer import ImageFeatures, Predictor, load_model  # noqa: E402
from interformer.click_engine import ENGINES, ClickEngineConfig  # noqa: E402
from interformer.encode_engine import ENCODE_ENGINES, ENCODE_PRECISIONS  # noqa: E402
from interformer.features import STORAGE_DTYPES  # noqa: E402
from interformer.predictor import set_cpu_threads  # noqa: E402
from pipeline.datasets import resolve  # noqa: E402
from pipeline.evaluation import EvalConfig, evaluate_sample  # noqa: E402
from pipeline.metrics import mean_noc, miou_at, noc, paired_difference_interval  # noqa: E402
from pipeline.segmenters import ModelSegmenter  # noqa: E402

K_VALUES = (1, 2, 3, 5, 10, 20)


class _Features:
    """A one-image feature 'reader' so that both segmenters use the same encoded features."""

    def __init__(self) -> None:
        self.feats = None

    def get(self, image_id: str):
        return self.feats


def stored(feats: ImageFeatures, dtype: str) -> ImageFeatures:
    """The features as a feature-table row of `dtype` gives them back."""
    if dtype == "float32":
        return feats
    flat, shapes = feats.to_flat(dtype)
    return ImageFeatures.from_flat(flat, shapes, feats.geometry, dtype=dtype)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def replay_agreement(exact: Predictor, fast: Predictor, feats, fast_feats, clicks: list) -> list[float]:
    """IoU of the candidate's mask with the exact mask after each click of the same click list (sessions as
    the evaluation opens them: no zoom-in, clicks in the padding taken)."""
    a = exact.session(feats, zoom_in=False, allow_padding=True)
    b = fast.session(fast_feats, zoom_in=False, allow_padding=True)
    out = []
    for click in clicks:
        if click is None:
            break
        row, col, positive = click
        out.append(_iou(a.add_click(row, col, positive).mask, b.add_click(row, col, positive).mask))
    return out


def summarize(results: list, max_clicks: int, protocol: str) -> dict:
    ious = [r.ious for r in results]
    clicks = [s for r in results for s in r.click_s if s is not None]
    return {"samples": len(results), "noc85": round(mean_noc(ious, 0.85, max_clicks, protocol), 4),
            "noc90": round(mean_noc(ious, 0.90, max_clicks, protocol), 4),
            **{f"miou@{k}": round(miou_at(ious, k), 4) for k in K_VALUES if k <= max_clicks},
            "click_ms_median": round(1000 * statistics.median(clicks), 1),
            "per_sample_noc85": [noc(x, 0.85, max_clicks, protocol) for x in ious],
            "per_sample_noc90": [noc(x, 0.90, max_clicks, protocol) for x in ious]}


def gate(rows: dict, max_delta_noc: float = 0.05, min_iou: float = 0.995) -> dict:
    """dNoC@85/90 with their 95 % paired-bootstrap intervals, and the gate's verdict (signed: only a candidate
    that needs more clicks fails)."""
    out = {}
    for t in ("85", "90"):
        out[f"delta_noc{t}"] = round(rows["fast"][f"noc{t}"] - rows["exact"][f"noc{t}"], 4)
        low, high = paired_difference_interval(rows["exact"][f"per_sample_noc{t}"],
                                               rows["fast"][f"per_sample_noc{t}"])
        out[f"delta_noc{t}_ci95"] = [round(low, 4), round(high, 4)]
    out["gate_passed"] = bool(out["delta_noc85"] <= max_delta_noc and out["delta_noc90"] <= max_delta_noc
                              and rows["per_click_iou_vs_fp32"]["mean"] >= min_iou)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="trained weights (.pth)")
    ap.add_argument("--engine", default="fast", choices=ENGINES, help="the candidate click engine (default: %(default)s)")
    ap.add_argument("--storage-dtype", default="float32", choices=sorted(STORAGE_DTYPES),
                    help="the candidate reads features round-tripped through this feature-table dtype "
                    "(the exact path reads fp32; default: %(default)s)")
    ap.add_argument("--encode-engine", default="torch", choices=ENCODE_ENGINES,
                    help="the candidate's features are encoded again by this engine (default: %(default)s)")
    ap.add_argument("--encode-precision", default="fp32", choices=ENCODE_PRECISIONS,
                    help="... at this precision; with torch fp32 both read the exact path's features (default: "
                    "%(default)s)")
    ap.add_argument("--datasets", nargs="+", default=["GrabCut", "Berkeley"], help="dataset specs as jobs/evaluate.py")
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--skip", type=int, default=0, help="samples to skip at the start of each dataset (default: 0)")
    ap.add_argument("--limit", type=int, default=None, help="N samples per dataset after --skip (default: all)")
    ap.add_argument("--max-clicks", type=int, default=20)
    ap.add_argument("--protocol", default="ritm", choices=["ritm", "interformer"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine-cache", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--max-delta-noc", type=float, default=0.05,
                    help="the gate: the candidate may need at most this many more clicks (NoC@85 and @90) than "
                    "fp32 (default: %(default)s, issue 11's)")
    ap.add_argument("--min-iou", type=float, default=0.995,
                    help="the gate: mean per-click IoU of the candidate's masks against fp32's (default: "
                    "%(default)s)")
    ap.epilog = "Exit status: 0 when the gate passes on every dataset, 1 when it fails on one (the report is written "
    ap.epilog += "either way)."
    args = ap.parse_args(argv)
    started = begin()
    set_cpu_threads(args.threads)
    model = load_model(args.checkpoint, device="cpu")
    exact = Predictor(model, device="cpu")
    fast = Predictor(model, device="cpu", engine=ClickEngineConfig(args.engine, cache_dir=args.engine_cache),
                     encode_engine=args.encode_engine, encode_precision=args.encode_precision)
    own_encoder = (args.encode_engine, args.encode_precision) != ("torch", "fp32")
    shared, candidate = _Features(), _Features()
    segmenters = {"exact": ModelSegmenter(exact, shared), "fast": ModelSegmenter(fast, candidate)}
    config = EvalConfig(protocol=args.protocol, max_clicks=args.max_clicks)
    report = {"checkpoint": args.checkpoint, "engine": fast.engine.name, "storage_dtype": args.storage_dtype,
              "candidate_encoder": fast.encoder.name,
              "protocol": args.protocol,
              "max_clicks": args.max_clicks, "skip": args.skip, "limit": args.limit, "threads": args.threads,
              "load_average_before": [round(v, 2) for v in os.getloadavg()], "datasets": {}}
    t_start = time.time()
    for spec in args.datasets:
        refs = resolve(spec, args.data_root)[args.skip:][: args.limit]
        runs: dict[str, list] = {"exact": [], "fast": []}
        agreement: list[float] = []
        for i, ref in enumerate(refs):
            sample = ref.load()
            shared.feats = exact.encode(sample.image)
            candidate.feats = stored(fast.encode(sample.image) if own_encoder else shared.feats, args.storage_dtype)
            for name, seg in segmenters.items():
                runs[name].append(evaluate_sample(seg, sample, config))
            agreement += replay_agreement(exact, fast, shared.feats, candidate.feats, runs["exact"][-1].clicks)
            print(f"{sample.dataset} {i + 1}/{len(refs)} {time.time() - t_start:.0f}s: exact NoC90 "
                  f"{mean_noc([runs['exact'][-1].ious], 0.9, args.max_clicks):.0f} fast "
                  f"{mean_noc([runs['fast'][-1].ious], 0.9, args.max_clicks):.0f}, min IoU vs fp32 so far "
                  f"{min(agreement):.4f}", flush=True)
        rows = {name: summarize(res, args.max_clicks, args.protocol) for name, res in runs.items()}
        name = refs[0].load().dataset if refs else spec
        rows["per_click_iou_vs_fp32"] = {"mean": round(float(np.mean(agreement)), 5),
                                         "min": round(float(np.min(agreement)), 5), "clicks": len(agreement)}
        rows.update(gate(rows, args.max_delta_noc, args.min_iou))
        report["datasets"][name] = rows
        print(json.dumps({name: rows}), flush=True)
    report["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print("\n| dataset | engine | NoC@85 | NoC@90 | " + " | ".join(f"mIoU@{k}" for k in K_VALUES if k <= args.max_clicks)
          + " | click ms |")
    print("|---|---|---|---|" + "---|" * len([k for k in K_VALUES if k <= args.max_clicks]) + "---|")
    for name, rows in report["datasets"].items():
        for eng in ("exact", "fast"):
            r = rows[eng]
            label = ("torch fp32" if eng == "exact" else
                     f"{report['engine']}, {report['candidate_encoder']} encoder, {args.storage_dtype} features")
            print(f"| {name} | {label} | {r['noc85']} | {r['noc90']} | "
                  + " | ".join(str(r[f'miou@{k}']) for k in K_VALUES if k <= args.max_clicks)
                  + f" | {r['click_ms_median']} |")
        ci85, ci90 = rows["delta_noc85_ci95"], rows["delta_noc90_ci95"]
        print(f"| {name} | difference (95 % interval) / agreement "
              f"| {rows['delta_noc85']:+} ({ci85[0]:+}, {ci85[1]:+}) "
              f"| {rows['delta_noc90']:+} ({ci90[0]:+}, {ci90[1]:+}) | per-click IoU "
              f"vs fp32 mean {rows['per_click_iou_vs_fp32']['mean']}, min {rows['per_click_iou_vs_fp32']['min']} "
              f"| gate {'passed' if rows['gate_passed'] else 'FAILED'} |")
    save("engine_quality", report, started, args.out)
    failed = [name for name, rows in report["datasets"].items() if not rows["gate_passed"]]
    if failed:
        print(f"gate FAILED on {', '.join(failed)}: keep serving the exact engine", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
