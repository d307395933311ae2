"""Serving capacity as a figure: p99 and median click latency against concurrent annotators, one line per
`bench/bench_backend.py --think-s` raw file (click engine x actors x threads), with the p99 target.

    python bench/plot_capacity.py bench/results/bench_backend-A.json bench/results/bench_backend-B.json \\
        --out docs/serving_capacity.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw", nargs="+", type=Path, help="bench_backend raw results files (run with --think-s)")
    p.add_argument("--out", type=Path, default=Path("docs/serving_capacity.png"), help="PNG to write")
    return p.parse_args(argv)


def series(path: Path) -> tuple[str, list[int], list[float], list[float], float, str]:
    """(label, levels, p99 over all requests, median, p99 target, CPU model) of one raw file."""
    record = json.loads(path.read_text())
    f = record["figures"]
    if not f.get("think_s"):
        raise SystemExit(f"{path}: not a serving-capacity run (no --think-s)")
    levels = sorted(int(k) for k in f["levels"])
    p99 = [f["levels"][str(k)]["p99_all_ms"] for k in levels]
    median = [f["levels"][str(k)]["median_ms"] for k in levels]
    label = (f"{f['click_engine']}, {f['actors']} actor(s) x {f['threads']} thread(s): "
             f"capacity {f['capacity_annotators']}")
    return label, levels, p99, median, f["p99_target_ms"], record["machine"]["lscpu"]["model_name"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    target, cpus = None, set()
    for path in args.raw:
        label, levels, p99, median, target, cpu = series(path)
        cpus.add(cpu)
        line, = ax.plot(levels, p99, marker="o", label=f"{label} (p99)")
        ax.plot(levels, median, marker=".", linestyle=":", color=line.get_color(), label="median")
    ax.axhline(target, color="black", linewidth=0.8, linestyle="--", label=f"p99 target {target:.0f} ms")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent annotators (1 s think time between clicks)")
    ax.set_ylabel("click -> mask over HTTP (ms)")
    ax.set_title(f"Serving capacity on 2 cores ({', '.join(sorted(cpus))}), 480x640 images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
