"""Where the compiled click network spends its time: OpenVINO's per-layer profile of one engine and size.

Converts Light's click network (random weights: timing does not depend on them) for one padded size with the
engine the product uses (interformer.click_engine, same compile settings plus PERF_COUNT), runs it on the
image's real inputs, and reports per-layer and per-layer-type medians over `--runs` inferences. The starting
point for a graph written for the runtime: which convolutions, transposes and fused subgraphs cost most.

    python bench/profile_click_network.py --precision f32 --size 512 --threads 2
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, then the checkout

from interformer import Predictor, load_model  # noqa: E402
from interformer.click_engine import ClickEngineConfig, OpenVINOEngine  # noqa: E402
from interformer.clicks import DEF_FG, UNKNOWN  # noqa: E402
from results_io import begin, save  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", choices=("f32", "bf16"), default="f32", help="OpenVINO inference precision")
    p.add_argument("--size", type=int, default=512, help="square image side in pixels")
    p.add_argument("--threads", type=int, default=2, help="inference threads")
    p.add_argument("--runs", type=int, default=10, help="profiled inferences (after 5 warm-up runs)")
    p.add_argument("--top", type=int, default=15, help="layers to list")
    p.add_argument("--out", type=Path, default=None, help="raw results file (default: bench/results/profile_click_network-UTC.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = begin()
    torch.set_num_threads(args.threads)
    model = load_model(None, variant="light", device="cpu")
    with tempfile.TemporaryDirectory() as cache:
        predictor = Predictor(model, device="cpu", engine=ClickEngineConfig(f"openvino-{args.precision}", cache_dir=cache))
        engine = predictor.engine
        if not isinstance(engine, OpenVINOEngine):
            raise SystemExit(f"openvino-{args.precision} is not available here (fell back to {engine.name})")
        feats = predictor.encode(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
        ref = np.full(feats.geometry.padded_size, UNKNOWN, np.uint8)
        ref[args.size // 2 - 10: args.size // 2 + 10, args.size // 2 - 10: args.size // 2 + 10] = DEF_FG
        predictor.predict_margin(feats, ref, None)  # converts the size and loads the image's inputs
        _, request, _ = next(iter(engine._compiled.values()))
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": args.precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                  "INFERENCE_NUM_THREADS": str(args.threads), "ENABLE_CPU_PINNING": "NO", "PERF_COUNT": "YES"}
        xml = next(Path(cache).rglob("*.xml"))
        prof = core.compile_model(core.read_model(str(xml)), "CPU", config)
        req = prof.create_infer_request()
        for i in range(len(prof.inputs)):
            np.copyto(req.get_input_tensor(i).data, request.get_input_tensor(i).data)
        for _ in range(5):
            req.infer()
        per_layer: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
        totals = []
        for _ in range(args.runs):
            req.infer()
            run_total = 0.0
            for p in req.profiling_info:
                ms = p.real_time.total_seconds() * 1e3
                per_layer[(p.node_name, p.node_type, p.exec_type)].append(ms)
                run_total += ms
            totals.append(run_total)
    layers = sorted(((float(np.median(v)), k) for k, v in per_layer.items()), reverse=True)
    by_type: dict[str, float] = collections.Counter()
    for ms, (_, node_type, exec_type) in layers:
        by_type[f"{node_type} ({exec_type})"] += ms
    figures = {"precision": args.precision, "size": args.size, "threads": args.threads, "runs": args.runs,
               "total_ms_median": round(float(np.median(totals)), 2),
               "by_type_ms": {k: round(v, 3) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
               "layers_ms": [{"name": n, "type": t, "exec": e, "ms": round(ms, 3)} for ms, (n, t, e) in layers]}
    print(f"openvino-{args.precision}, {args.size}x{args.size}, {args.threads} threads: "
          f"{figures['total_ms_median']} ms per inference (sum of layers, median of {args.runs})")
    print("\nby layer type:")
    for k, v in list(figures["by_type_ms"].items())[: args.top]:
        print(f"  {v:8.2f} ms  {k}")
    print("\nlayers:")
    for row in figures["layers_ms"][: args.top]:
        print(f"  {row['ms']:8.2f} ms  {row['name']} [{row['type']}, {row['exec']}]")
    save("profile_click_network", figures, started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
