"""Reduced-precision features (not a test): bf16 encoding and compact feature-table dtypes against fp32.

Per size, on a real image (GrabCut / Berkeley resized): the encoder in fp32 and under bf16 autocast,
interleaved (median ms); the pyramid's error against fp32 per level (max abs, relative RMS) for the bf16
encoder and for each storage dtype's round trip (fp16, bfloat16, int8); stored bytes per image; and the masks
of the exact click path on each variant's features against fp32 features (min IoU per click, pixels
differing) for the same clicks.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_feature_precision.py --threads 2 --out bench/results/feature_precision.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from bench_model import _clicks, _iou, _real_image  # noqa: E402
from results_io import begin, save  # noqa: E402

from interformer import ImageFeatures, Predictor, load_model  # noqa: E402
from interformer.runtime import native_bf16  # noqa: E402
from interformer.predictor import set_cpu_threads  # noqa: E402

STORAGE = ("float16", "bfloat16", "int8", "int8sqrt")


def pyramid_error(ref: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> list[dict]:
    """Per pyramid level: the max absolute and the relative RMS error of `other` against `ref`."""
    out = []
    for a, b in zip(ref, other):
        d = (b - a).float()
        out.append({"max_abs": float(d.abs().max()), "rel_rms": float(d.norm() / a.norm().clamp_min(1e-12))})
    return out


def agreement(predictor: Predictor, ref: ImageFeatures, other: ImageFeatures, clicks: list) -> dict:
    a, b = predictor.session(ref), predictor.session(other)
    ious, differing = [], []
    for r, c, pos in clicks:
        ma, mb = a.add_click(r, c, pos).mask, b.add_click(r, c, pos).mask
        ious.append(_iou(ma, mb))
        differing.append(int((ma != mb).sum()))
    return {"min_iou_per_click": round(min(ious), 5), "mean_iou": round(float(np.mean(ious)), 5),
            "pixels_differing_max_per_click": max(differing)}


def stored(feats: ImageFeatures, dtype: str) -> ImageFeatures:
    flat, shapes = feats.to_flat(dtype)
    return ImageFeatures.from_flat(flat, shapes, feats.geometry, dtype=dtype)


def bench_size(fp32: Predictor, bf16: Predictor, image: np.ndarray, gt: np.ndarray, reps: int, clicks: int) -> dict:
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    feats: dict[str, ImageFeatures] = {}
    for _ in range(reps):
        for name, pred in (("fp32", fp32), ("bf16", bf16)):
            t = time.perf_counter()
            feats[name] = pred.encode(image)
            times[name].append(time.perf_counter() - t)
    ref = feats["fp32"]
    click_list = _clicks(gt, clicks)
    variants = {"bf16_encode": feats["bf16"], **{f"stored_{d}": stored(ref, d) for d in STORAGE}}
    h, w = image.shape[:2]
    row = {"size": f"{w}x{h}",
           "encode_ms_median": {k: round(1000 * statistics.median(v), 1) for k, v in times.items()},
           "bf16_encode_ratio": round(statistics.median(times["bf16"]) / statistics.median(times["fp32"]), 3),
           "stored_bytes": {d: ref.nbytes(d) for d in ("float32", *STORAGE)}}
    for name, other in variants.items():
        row[name] = {"pyramid_error": pyramid_error(ref.pyramid, other.pyramid), "masks_vs_fp32": agreement(fp32, ref, other, click_list)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="light", help="model variant (random weights unless --checkpoint)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="encodes per precision (interleaved)")
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--sizes", default="512x512,1024x768")
    ap.add_argument("--image-index", type=int, default=0)
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    started = begin()
    set_cpu_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.checkpoint, variant=None if args.checkpoint else args.variant, device="cpu")
    fp32 = Predictor(model, device="cpu")
    bf16 = Predictor(model, device="cpu", encode_precision="bf16")
    load_before = os.getloadavg()
    rows = []
    for i, size in enumerate(args.sizes.split(",")):
        w, h = (int(v) for v in size.lower().split("x"))
        image, gt = _real_image(Path(args.data_root), args.image_index + i, h, w)
        rows.append(bench_size(fp32, bf16, image, gt, args.reps, args.clicks))
        print(json.dumps(rows[-1]), flush=True)
    result = {"variant": model.config.name, "checkpoint": args.checkpoint, "threads": args.threads,
              "native_bf16": native_bf16(), "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in os.getloadavg()], "rows": rows}
    print("\n| size | variant | stored bytes | P0..P3 relative RMS error | masks vs fp32: min IoU / max px differing |")
    print("|---|---|---|---|---|")
    for r in rows:
        for name in ("bf16_encode", *(f"stored_{d}" for d in STORAGE)):
            v = r[name]
            nbytes = r["stored_bytes"].get(name.removeprefix("stored_"), r["stored_bytes"]["float16"])
            errs = " / ".join(f"{e['rel_rms']:.1e}" for e in v["pyramid_error"])
            print(f"| {r['size']} | {name} | {nbytes:,} | {errs} | {v['masks_vs_fp32']['min_iou_per_click']} / "
                  f"{v['masks_vs_fp32']['pixels_differing_max_per_click']} |")
        print(f"| {r['size']} | encode ms fp32 / bf16 | {r['encode_ms_median']['fp32']} / {r['encode_ms_median']['bf16']} "
              f"({r['bf16_encode_ratio']}x) | | |")
    save("feature_precision", result, started, args.out)


if __name__ == "__main__":
    main()
