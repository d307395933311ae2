"""The image encoder (ViT + SimpleFPN) under OpenVINO against the product's torch path (a measurement, not yet a
product path: `jobs/encode.py` encodes with torch, fp32 or bf16 autocast).

For each padded size, in one process: the product's `Predictor.encode_pyramid` in fp32 and (where the CPU has
native bf16) under bf16 autocast, then the same backbone converted by OpenVINO (`openvino.convert_model`, one
static model per size) and compiled in f32 and bf16 with the click engine's settings (latency hint, one stream,
`--threads`, no pinning). Reports wall medians, the conversion time, and each pyramid level's relative RMS
error against torch fp32 (so f32 under the runtime shows whether it computes the same function).

    python bench/bench_encode_runtime.py --variant light --sizes 512 --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, then the checkout

from interformer import Predictor, load_model  # noqa: E402
from interformer.click_engine import native_bf16  # noqa: E402
from interformer.predictor import set_cpu_threads  # noqa: E402
from bench_feature_precision import pyramid_error  # noqa: E402
from results_io import begin, save  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="light", help="model variant, random weights (timing does not depend on them)")
    p.add_argument("--sizes", default="512", help="comma-separated square padded sizes (multiples of 32)")
    p.add_argument("--threads", type=int, default=2, help="torch and runtime threads")
    p.add_argument("--repeats", type=int, default=5, help="timed encodes per path and size (after one warm-up)")
    p.add_argument("--out", type=Path, default=None, help="raw results file (default: bench/results/bench_encode_runtime-UTC.json)")
    return p.parse_args(argv)


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


def bench_size(predictor: Predictor, size: int, threads: int, repeats: int, bf16: bool) -> dict:
    import openvino as ov

    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    row: dict = {"size": size}
    reference = predictor.encode_pyramid(x)
    row["torch_fp32_ms"] = _median_ms(lambda: predictor.encode_pyramid(x), repeats)
    if bf16:
        predictor.encode_precision = "bf16"
        row["torch_bf16_autocast_ms"] = _median_ms(lambda: predictor.encode_pyramid(x), repeats)
        row["torch_bf16_autocast_rel_rms"] = _rel_rms(reference, predictor.encode_pyramid(x))
        predictor.encode_precision = "fp32"
    t = time.perf_counter()
    with torch.no_grad():
        converted = ov.convert_model(predictor.model.backbone, example_input=(x,), input=[(list(x.shape), x.dtype)])
    row["convert_s"] = round(time.perf_counter() - t, 2)
    core = ov.Core()
    for precision in ("f32", "bf16") if bf16 else ("f32",):
        compiled = core.compile_model(converted, "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads), "ENABLE_CPU_PINNING": "NO"})
        request = compiled.create_infer_request()
        row[f"openvino_{precision}_ms"] = _median_ms(lambda: request.infer({0: x.numpy()}), repeats)
        row[f"openvino_{precision}_rel_rms"] = _rel_rms(
            reference, [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(len(reference))])
    fp32 = row["torch_fp32_ms"]
    row["ratios_to_torch_fp32"] = {k[:-3]: round(v / fp32, 3) for k, v in row.items()
                                   if k.endswith("_ms") and k != "torch_fp32_ms"}
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = begin()
    set_cpu_threads(args.threads)
    torch.manual_seed(0)
    predictor = Predictor(load_model(None, variant=args.variant, device="cpu"), device="cpu")
    bf16 = native_bf16()
    load_before = os.getloadavg()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows.append(bench_size(predictor, size, args.threads, args.repeats, bf16))
        print(rows[-1], flush=True)
    figures = {"variant": args.variant, "threads": args.threads, "repeats": args.repeats, "native_bf16": bf16,
               "load_average_before": [round(v, 2) for v in load_before],
               "load_average_after": [round(v, 2) for v in os.getloadavg()], "rows": rows}
    print("\n| size | torch fp32 ms | " + " | ".join(rows[0]["ratios_to_torch_fp32"]) + " |")
    for r in rows:
        cells = [f"{r[k + '_ms']} ({v}x)" for k, v in r["ratios_to_torch_fp32"].items()]
        print(f"| {r['size']}² | {r['torch_fp32_ms']} | " + " | ".join(cells) + " |")
    save("bench_encode_runtime", figures, started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
