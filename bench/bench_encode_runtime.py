"""The image encoder (ViT + SimpleFPN) per encode engine (interformer.encode_engine), on the product's path.

In one process, per padded size: `Predictor.encode_pyramid` with the torch engine in fp32 and (where the CPU has
native bf16) under bf16 autocast, and with the openvino engine in f32 and bf16 (one dynamic-shape conversion for
all sizes, made at the start into a fresh cache and timed, as is reading it back from the cache). Reports wall
medians and each pyramid level's relative RMS error against torch fp32 (so openvino f32 shows whether it computes
the same function).

    python bench/bench_encode_runtime.py --variant light --sizes 512,1024x768,1024 --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, then the checkout

from interformer import Predictor, load_model  # noqa: E402
from interformer.click_engine import ClickEngineConfig  # noqa: E402
from interformer.encode_engine import OpenVINOEncoder  # noqa: E402
from interformer.predictor import set_cpu_threads  # noqa: E402
from interformer.runtime import native_bf16  # noqa: E402
from bench_feature_precision import pyramid_error  # noqa: E402
from results_io import begin, save  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="light", help="model variant, random weights (timing does not depend on them)")
    p.add_argument("--sizes", default="512", help="comma-separated padded sizes, S (square) or WxH, multiples of 32")
    p.add_argument("--threads", type=int, default=2, help="torch and runtime threads")
    p.add_argument("--repeats", type=int, default=5, help="timed encodes per path and size (after one warm-up)")
    p.add_argument("--out", type=Path, default=None, help="raw results file (default: bench/results/bench_encode_runtime-UTC.json)")
    return p.parse_args(argv)


def parse_size(text: str) -> tuple[int, int]:
    """"512" -> (512, 512); "1024x768" (W x H) -> (768, 1024) as (H, W)."""
    w, _, h = text.lower().partition("x")
    return (int(h or w), int(w))


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 1)


def _rel_rms(want: list[torch.Tensor], got: list[torch.Tensor]) -> list[float]:
    return [level["rel_rms"] for level in pyramid_error(want, got)]


def bench_size(predictors: dict[str, Predictor], size: tuple[int, int], repeats: int) -> dict:
    """Median ms of each predictor's encode of one random batch, and its pyramid's error against torch fp32."""
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(size[0] * 7919 + size[1]))
    row: dict = {"size": f"{size[1]}x{size[0]}"}
    reference = predictors["torch_fp32"].encode_pyramid(x)
    for name, predictor in predictors.items():
        row[f"{name}_engine"] = predictor.encoder.name
        row[f"{name}_ms"] = _median_ms(lambda: predictor.encode_pyramid(x), repeats)
        if name != "torch_fp32":
            row[f"{name}_rel_rms"] = _rel_rms(reference, predictor.encode_pyramid(x))
    fp32 = row["torch_fp32_ms"]
    row["ratios_to_torch_fp32"] = {k[:-3]: round(v / fp32, 3) for k, v in row.items()
                                   if k.endswith("_ms") and k != "torch_fp32_ms"}
    return row


def conversion_seconds(model, cache: Path) -> dict:
    """Seconds to build the openvino encoder into an empty cache (convert + save + compile + the first 64² batch),
    then from the filled cache (read + compile + the same batch)."""
    out = {}
    for label in ("convert_s", "from_cache_s"):
        t = time.perf_counter()
        encoder = OpenVINOEncoder(model.backbone, "fp32", cache)
        encoder(torch.zeros(1, 3, 64, 64))
        out[label] = round(time.perf_counter() - t, 2)
        if encoder._failed:
            raise RuntimeError(f"the openvino encoder could not be built: {encoder._failed}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = begin()
    set_cpu_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(None, variant=args.variant, device="cpu")
    bf16 = native_bf16()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="encode-engine-") as cache:
        conversion = conversion_seconds(model, Path(cache))
        print(conversion, flush=True)
        config = ClickEngineConfig(cache_dir=cache)
        paths = [("torch_fp32", "torch", "fp32"), ("openvino_f32", "openvino", "fp32")]
        if bf16:
            paths += [("torch_bf16_autocast", "torch", "bf16"), ("openvino_bf16", "openvino", "bf16")]
        predictors = {name: Predictor(model, device="cpu", engine=config, encode_engine=engine, encode_precision=precision)
                      for name, engine, precision in paths}
        rows = []
        for size in (parse_size(s) for s in args.sizes.split(",")):
            rows.append(bench_size(predictors, size, args.repeats))
            print(rows[-1], flush=True)
    figures = {"variant": args.variant, "threads": args.threads, "repeats": args.repeats, "native_bf16": bf16,
               **conversion, "load_average_before": [round(v, 2) for v in load_before],
               "load_average_after": [round(v, 2) for v in os.getloadavg()], "rows": rows}
    print(f"\nconversion {conversion['convert_s']} s once (all sizes), {conversion['from_cache_s']} s from the cache")
    print("| size | torch fp32 ms | " + " | ".join(rows[0]["ratios_to_torch_fp32"]) + " |")
    for r in rows:
        cells = [f"{r[k + '_ms']} ({v}x)" for k, v in r["ratios_to_torch_fp32"].items()]
        print(f"| {r['size']} | {r['torch_fp32_ms']} | " + " | ".join(cells) + " |")
    save("bench_encode_runtime", figures, started, args.out)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
