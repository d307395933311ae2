"""Bulk pre-annotation throughput on CPU from stored features, and its scaling with Ray workers.

A benchmark, not a test. It encodes N benchmark images (GrabCut then Berkeley, native size) once into a
feature table under --work-dir (kept between runs), writes a COCO prompt file with two objects per image
(each with a box and a dilated ground-truth mask; --use picks one), then runs jobs/preannotate.py:
  - in this machine's process (--workers 0), and on a private local Ray with 1, 2, ... CPU workers
    (1 CPU and 1 torch thread each);
  - for box prompts (one click per object) and for coarse-mask prompts with --max-clicks K and target
    IoU 1.0, so that every object gets exactly K simulated clicks.
The model is the seeded random 'small' variant: its I-MSA and head, the whole per-click work measured
here, are Light's (only the ViT, which this job never runs, is smaller). Figures come from the job's own
summary: objects/s and clicks/s once the workers are up, the workers' CPU time per object (what a core
costs, whatever else the machine runs), their start-up time, the wall time and the load average.

    python bench/bench_preannotate.py                            # 16 images, workers 0 1 2
    python bench/bench_preannotate.py --images 32 --workers 1 2 4 --max-clicks 5 --out runs/bench_pre.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.datasets import berkeley, grabcut  # noqa: E402
from pipeline.encoding import EncoderSpec, build_predictor  # noqa: E402
from pipeline.feature_store import EncodedImage, FeatureStore, feature_rows  # noqa: E402
from pipeline.prompts import encode_mask  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from results_io import begin, save  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
JOB = ROOT / "jobs" / "preannotate.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16, help="benchmark images to pre-annotate (default: %(default)s)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="worker counts to run; 0 = in the job's own process (default: 0 1 2)")
    p.add_argument("--max-clicks", type=int, default=5, help="clicks per coarse-mask object (default: %(default)s)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the job's local Ray (default: all cores)")
    p.add_argument("--repeats", type=int, default=1, help="runs per setting; the best is reported (default: 1)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench_preannotate",
                   help="images, feature table and runs (default: runs/bench_preannotate)")
    p.add_argument("--ray-niceness", type=int, default=0,
                   help="niceness of the Ray workers (RAY_worker_niceness); Ray's own default is 15, which on a busy "
                   "host hands them less CPU than the in-process run gets (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="raw results file (default: bench/results/bench_preannotate-UTC.json)")
    return p.parse_args(argv)


def prepare(work: Path, n: int) -> Path:
    """Images, their features ('small', seed 0, as the job builds it) and the prompt file; returns its path."""
    refs = (grabcut(SHARED / "GrabCut") + berkeley(SHARED / "Berkeley"))[:n]
    image_root = work / "images"
    predictor = build_predictor(EncoderSpec(variant="small"), device="cpu")
    store = FeatureStore(str(work / "db"), "features")
    stored = store.existing_ids(predictor.fingerprint)
    images, annotations, todo = [], [], []
    for i, ref in enumerate(refs):
        sample = ref.load()
        name = f"{ref.dataset}/{ref.sample_id}.png"
        path = image_root / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample.image).save(path)
        h, w = sample.gt.shape
        gt = sample.gt == 1
        rows, cols = np.nonzero(gt)
        bbox = [float(cols.min()), float(rows.min()), float(np.ptp(cols) + 1), float(np.ptp(rows) + 1)]
        coarse = cv2.dilate(gt.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        images.append({"id": i + 1, "file_name": name, "height": int(h), "width": int(w)})
        annotations.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 1, "bbox": bbox,
                            "segmentation": encode_mask(coarse)})
        annotations.append({"id": 2 * i + 2, "image_id": i + 1, "category_id": 1, "bbox": bbox,
                            "segmentation": encode_mask(coarse)})
        if name not in stored:
            todo.append((name, str(path), sample.image))
    for name, path, image in todo:
        print(f"encoding {name} {image.shape[1]}x{image.shape[0]}", flush=True)
        item = EncodedImage(name, path, "", predictor.encode(image))
        store.add(feature_rows([item], predictor.fingerprint))
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps({"images": images, "annotations": annotations,
                                   "categories": [{"id": 1, "name": "object"}]}))
    return prompts


def run_job(work: Path, prompts: Path, use: str, workers: int, max_clicks: int, num_cpus: int | None,
            tag: str, niceness: int) -> dict:
    run_dir = work / "runs" / tag
    cmd = [sys.executable, str(JOB), "--coco", str(prompts), "--image-root", str(work / "images"),
           "--db", str(work / "db"), "--variant", "small", "--use", use, "--max-clicks", str(max_clicks),
           "--target-iou", "1.0", "--workers", str(workers), "--coco-out", str(run_dir / "masks.json"),
           "--run-dir", str(run_dir), "--fresh"]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    env = {**os.environ, "RAY_worker_niceness": str(niceness)}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    busy = s["seconds"] - s["startup_s"]
    return {"use": use, "workers": workers, "objects": s["computed_objects"], "clicks": s["computed_steps"],
            "objects_per_s": s["objects_per_s"], "clicks_per_s": s["steps_per_s"],
            "startup_s": s["startup_s"], "busy_s": busy, "wall_s": wall, "load_before": load,
            "cpu_ms_per_object": 1e3 * s["worker_cpu_s"] / max(1, s["computed_objects"]),
            "cpu_ms_per_click": 1e3 * s["worker_cpu_s"] / max(1, s["computed_steps"])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = begin()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    prompts = prepare(work, args.images)
    results = []
    for use in ("box", "mask"):
        for workers in args.workers:
            best = None
            for r in range(args.repeats):
                res = run_job(work, prompts, use, workers, args.max_clicks, args.num_cpus, f"{use}-w{workers}-r{r}",
                              args.ray_niceness)
                print(f"{use:4s} workers={workers}: {res['objects_per_s']:.2f} objects/s, "
                      f"{res['clicks_per_s']:.1f} clicks/s, start-up {res['startup_s']:.1f} s, "
                      f"wall {res['wall_s']:.1f} s (load {res['load_before']:.1f})", flush=True)
                if best is None or res["objects_per_s"] > best["objects_per_s"]:
                    best = res
            results.append(best)
    cores = os.cpu_count()
    print(f"\n{args.images} images x 2 objects, model small (Light's I-MSA + head), {cores} cores, "
          f"coarse masks: {args.max_clicks} clicks each, Ray workers at niceness {args.ray_niceness}\n")
    print("| prompts | workers | objects/s | clicks/s | CPU ms / object | start-up s | busy s | wall s | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        label = "in-process" if r["workers"] == 0 else str(r["workers"])
        print(f"| {r['use']} | {label} | {r['objects_per_s']:.2f} | {r['clicks_per_s']:.1f} | "
              f"{r['cpu_ms_per_object']:.0f} | {r['startup_s']:.1f} | {r['busy_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['load_before']:.1f} |")
    save("bench_preannotate", {"images": args.images, "max_clicks": args.max_clicks, "cores": cores,
                               "ray_niceness": args.ray_niceness, "results": results}, started, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
