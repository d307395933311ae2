"""Benchmark of the model's two stages on CPU (not a test): ms per click per engine, ms per encode, bytes per image.

For each size, the whole click step (`InteractiveSession.add_click`: disk, network, upsample, threshold,
state update) of every click engine (interformer.click_engine: torch = the exact fp32 reference,
openvino-f32 = the runtime's f32 that passes the parity fixtures, openvino-bf16 = the fast mode) and the
official computation order (`official_step.py`) run interleaved in the same process on the same features
of a real image (GrabCut / Berkeley, resized to the size), after checking that the exact path and the
official order give the same masks. Clicks: a positive one on the object, then alternating, drawn from the
ground truth. Reported: medians and p90 per path, ratios to the official order, the fast modes' mask
agreement with the exact path (min IoU per click, pixels differing), the CPU flags, and the load average
(shared machines inflate absolute times: compare the ratios of one run).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_model.py --threads 2 --out bench/results/model_engines.json
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
import torch  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, then the checkout
from official_step import official_click_step  # noqa: E402
from results_io import begin, save  # noqa: E402

from interformer import Predictor, load_model  # noqa: E402
from interformer.predictor import set_cpu_threads  # noqa: E402


ENGINES = ("torch", "openvino-f32", "openvino-bf16")


def _real_image(data_root: Path, index: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A GrabCut (then Berkeley) image and its object mask, resized to (h, w)."""
    import cv2

    from pipeline.datasets import berkeley, grabcut

    refs = grabcut(data_root / "GrabCut") + berkeley(data_root / "Berkeley")
    sample = refs[index % len(refs)].load()
    image = cv2.resize(sample.image, (w, h), interpolation=cv2.INTER_AREA)
    gt = cv2.resize((sample.gt == 1).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return image, gt


def _clicks(gt: np.ndarray, n: int, seed: int = 0) -> list[tuple[int, int, bool]]:
    """A positive click on the object, then alternating negative / positive ones from the ground truth."""
    rng = np.random.default_rng(seed)
    fg, bg = np.argwhere(gt), np.argwhere(~gt)
    out = []
    for i in range(n):
        positive = i % 2 == 0 or len(bg) == 0
        r, c = (fg if positive and len(fg) else bg)[rng.integers(0, len(fg) if positive and len(fg) else len(bg))]
        out.append((int(r), int(c), positive))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def _stats(times: list[float], cpu: list[float]) -> dict:
    """Wall-clock median / p90, and the median process CPU time (less sensitive to other processes' load)."""
    return {"median_ms": round(1000 * statistics.median(times), 1), "p90_ms": round(1000 * float(np.percentile(times, 90)), 1),
            "cpu_median_ms": round(1000 * statistics.median(cpu), 1)}


def bench_size(predictors: dict[str, Predictor], official_model, image: np.ndarray, gt: np.ndarray, clicks: int) -> dict:
    h, w = image.shape[:2]
    exact = predictors["torch"]
    t0 = time.perf_counter()
    feats = exact.encode(image)
    encode_s = time.perf_counter() - t0
    pyramid = [p.cpu() for p in feats.pyramid]
    sessions = {name: pred.session(feats) for name, pred in predictors.items()}
    ref_label = sessions["torch"].ref_label.copy()
    times: dict[str, list[float]] = {name: [] for name in ["official", *predictors]}
    cpu: dict[str, list[float]] = {name: [] for name in ["official", *predictors]}
    first_click_ms, agreement, mismatched = {}, {name: [] for name in predictors if name != "torch"}, 0
    for k, (r, c, pos) in enumerate(_clicks(gt, clicks)):
        t, c0 = time.perf_counter(), time.process_time()
        pred_o, ref_label_next, logits = official_click_step(official_model, pyramid, ref_label, r, c, pos)
        t_official, c_official = time.perf_counter() - t, time.process_time() - c0
        results, step, step_cpu = {}, {}, {}
        for name, session in sessions.items():
            t, c0 = time.perf_counter(), time.process_time()
            results[name] = session.add_click(r, c, pos)
            step[name], step_cpu[name] = time.perf_counter() - t, time.process_time() - c0
            if k == 0:
                first_click_ms[name] = round(1000 * step[name], 1)
        res = results["torch"]
        margin = (logits[0, 1] - logits[0, 0]).numpy()
        differ = res.padded_mask != pred_o
        mismatched += int(differ.sum())
        if np.any(np.abs(margin[differ]) > 1e-4):
            raise AssertionError("the exact step and the official computation disagree")
        ref_label = sessions["torch"].ref_label.copy() if differ.any() else ref_label_next
        for name in agreement:
            a, b = results[name].mask, res.mask
            agreement[name].append((_iou(a, b), int((a != b).sum())))
        if k >= 2:  # warm-up (the first click of a runtime engine converts and compiles the size)
            times["official"].append(t_official)
            cpu["official"].append(c_official)
            for name in predictors:
                times[name].append(step[name])
                cpu[name].append(step_cpu[name])
    official = statistics.median(times["official"])
    row = {
        "size": f"{w}x{h}",
        "encode_ms": round(1000 * encode_s, 1),
        "official": _stats(times["official"], cpu["official"]),
        "pixels_differing_exact_vs_official_at_tiny_margins": mismatched,
        "stored_bytes_fp16": feats.nbytes("float16"),
        "stored_bytes_fp32": feats.nbytes("float32"),
    }
    for name, pred in predictors.items():
        row[name] = {**_stats(times[name], cpu[name]),
                     "ratio_to_official": round(statistics.median(times[name]) / official, 3),
                     "cpu_ratio_to_official": round(statistics.median(cpu[name]) / statistics.median(cpu["official"]), 3),
                     "first_click_ms": first_click_ms[name], "engine": pred.engine.name}
        if name in agreement:
            ious = [a[0] for a in agreement[name]]
            row[name]["mask_vs_exact"] = {"min_iou_per_click": round(min(ious), 5),
                                          "mean_iou": round(float(np.mean(ious)), 5),
                                          "pixels_differing_total": sum(a[1] for a in agreement[name]),
                                          "pixels_differing_max_per_click": max(a[1] for a in agreement[name])}
    return row


def main() -> None:
    from interformer.click_engine import ClickEngineConfig
    from interformer.runtime import cpu_flags, native_bf16

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="light", help="model variant (random weights unless --checkpoint)")
    ap.add_argument("--checkpoint", default=None, help="optional weights file; timing does not depend on weights")
    ap.add_argument("--threads", type=int, default=2, help="torch / runtime intra-op threads")
    ap.add_argument("--clicks", type=int, default=12, help="clicks per size (the first 2 are warm-up)")
    ap.add_argument("--sizes", default="512x512,1024x768", help="comma-separated WxH image sizes")
    ap.add_argument("--image-index", type=int, default=0, help="which GrabCut/Berkeley image (GrabCut first)")
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                    help="folder holding GrabCut/ and Berkeley/ (default: %(default)s)")
    ap.add_argument("--engine-cache", default=None, help="click-engine cache folder (default: the user cache)")
    ap.add_argument("--out", default=None, help="raw results file (default: bench/results/bench_model-UTC.json)")
    args = ap.parse_args()
    started = begin()
    set_cpu_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.checkpoint, variant=None if args.checkpoint else args.variant, device="cpu")
    official_model = load_model(args.checkpoint, variant=None if args.checkpoint else args.variant, device="cpu")
    official_model.load_state_dict(model.state_dict())
    predictors = {name: Predictor(model, device="cpu", engine=ClickEngineConfig(name, cache_dir=args.engine_cache))
                  for name in ENGINES}
    flags = sorted(f for f in cpu_flags() if f.startswith(("amx", "avx512", "avx2", "avx_vnni", "fma")))
    load_before = os.getloadavg()
    rows = []
    for i, size in enumerate(args.sizes.split(",")):
        w, h = (int(v) for v in size.lower().split("x"))
        image, gt = _real_image(Path(args.data_root), args.image_index + i, h, w)
        rows.append(bench_size(predictors, official_model, image, gt, args.clicks))
        print(json.dumps(rows[-1]), flush=True)
    import openvino

    result = {"variant": model.config.name, "checkpoint": args.checkpoint, "threads": args.threads,
              "torch": torch.__version__, "openvino": openvino.__version__,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu_count": os.cpu_count(),
              "cpu_flags": flags, "native_bf16": native_bf16(),
              "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in os.getloadavg()], "rows": rows}
    print(f"\nCPU flags {' '.join(flags)}; load average {load_before[0]:.1f} -> "
          f"{result['load_average_after'][0]:.1f} on {os.cpu_count()} cores (absolute times inflated by the load)")
    print("\nwall median / p90 ms (ratio to the official order; CPU-time ratio)")
    print("\n| size | official order ms | exact fp32 (torch) | openvino-f32 | fast (openvino-bf16) | fast min IoU/click |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[n]['median_ms']} / {r[n]['p90_ms']} ({r[n]['ratio_to_official']}x; {r[n]['cpu_ratio_to_official']}x)"
                 for n in ENGINES]
        print(f"| {r['size']} | {r['official']['median_ms']} / {r['official']['p90_ms']} | {' | '.join(cells)} "
              f"| {r['openvino-bf16']['mask_vs_exact']['min_iou_per_click']} |")
    save("bench_model", result, started, args.out)


if __name__ == "__main__":
    main()
