"""Benchmark of the model's two stages on CPU (not a test): ms per click, ms per encode, bytes per image.

For each size, our full click step (`InteractiveSession.add_click`: disk, I-MSA + head with cached
keys/values, upsample, threshold, state update, crop) and the official computation order
(`official_step.py`) run interleaved in the same process on the same features, after checking that
they give the same masks. Figures are medians; compare the ratio, since shared machines are noisy.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_model.py --threads 2
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


def _clicks(h: int, w: int, n: int, seed: int = 0) -> list[tuple[int, int, bool]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, h)), int(rng.integers(0, w)), bool(i == 0 or rng.random() < 0.6)) for i in range(n)]


def bench_size(predictor: Predictor, official_model, h: int, w: int, clicks: int) -> dict:
    image = np.random.default_rng(1).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    feats = predictor.encode(image)
    encode_s = time.perf_counter() - t0
    pyramid = [p.cpu() for p in feats.pyramid]
    session = predictor.session(feats)
    ref_label = session.ref_label.copy()
    ours, official, mismatched = [], [], 0
    for k, (r, c, pos) in enumerate(_clicks(h, w, clicks)):
        t = time.perf_counter()
        pred_o, ref_label_next, logits = official_click_step(official_model, pyramid, ref_label, r, c, pos)
        t_official = time.perf_counter() - t
        t = time.perf_counter()
        res = session.add_click(r, c, pos)
        t_ours = time.perf_counter() - t
        margin = (logits[0, 1] - logits[0, 0]).numpy()
        differ = res.padded_mask != pred_o
        mismatched += int(differ.sum())
        if np.any(np.abs(margin[differ]) > 1e-4):
            raise AssertionError("our step and the official computation disagree")
        ref_label = session.ref_label.copy() if differ.any() else ref_label_next
        if k >= 2:  # warm-up
            ours.append(t_ours)
            official.append(t_official)
    return {
        "size": f"{w}x{h}",
        "encode_ms": round(1000 * encode_s, 1),
        "ours_click_ms_median": round(1000 * statistics.median(ours), 1),
        "official_click_ms_median": round(1000 * statistics.median(official), 1),
        "speedup": round(statistics.median(official) / statistics.median(ours), 2),
        "ours_click_ms_p90": round(1000 * float(np.percentile(ours, 90)), 1),
        "pixels_differing_at_tiny_margins": mismatched,
        "stored_bytes_fp16": feats.nbytes("float16"),
        "stored_bytes_fp32": feats.nbytes("float32"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="light", help="model variant (random weights unless --checkpoint)")
    ap.add_argument("--checkpoint", default=None, help="optional weights file; timing does not depend on weights")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--clicks", type=int, default=12, help="clicks per size (the first 2 are warm-up)")
    ap.add_argument("--sizes", default="512x512,1024x768", help="comma-separated WxH image sizes")
    ap.add_argument("--out", default=None, help="raw results file (default: bench/results/bench_model-UTC.json)")
    args = ap.parse_args()
    started = begin()
    set_cpu_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.checkpoint, variant=None if args.checkpoint else args.variant, device="cpu")
    official_model = load_model(args.checkpoint, variant=None if args.checkpoint else args.variant, device="cpu")
    official_model.load_state_dict(model.state_dict())
    predictor = Predictor(model, device="cpu")
    rows = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        rows.append(bench_size(predictor, official_model, h, w, args.clicks))
        print(json.dumps(rows[-1]), flush=True)
    result = {"variant": model.config.name, "threads": args.threads, "torch": torch.__version__,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu_count": os.cpu_count(), "rows": rows}
    print("\n| size | encode ms | click ms (ours) | click ms (official order) | speed-up | stored fp16 / fp32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['encode_ms']} | {r['ours_click_ms_median']} | {r['official_click_ms_median']} "
              f"| {r['speedup']}x | {r['stored_bytes_fp16']:,} / {r['stored_bytes_fp32']:,} B |")
    save("bench_model", result, started, args.out)


if __name__ == "__main__":
    main()
