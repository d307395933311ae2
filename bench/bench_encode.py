"""Encoding throughput (images/s) and where the time goes: decode, encode, write.

    python bench/bench_encode.py                         # light variant, 16 images, this machine's CPUs
    python bench/bench_encode.py --variant small --images 32
    python bench/bench_encode.py --skip-job              # only the in-process breakdown
    python bench/bench_encode.py --latency 512x512 --latency-repeats 4 --images 0 --skip-job   # one-image encode

Inputs are the sample photos (samples/, 451x300 to 640x427) copied to --images files. Two measurements:
  1. in process, stage by stage as the job runs them: read + sha256 + decode + resize (decode_stage),
     the ViT + SimpleFPN forward in batches (EncoderStage, CUDA when available), serialisation +
     fragment write + commit (write_stage + FeatureStore.commit_fragments);
  2. the whole job, `python jobs/encode.py` on a private local Ray: images/s over the pipeline
     (actor start-up included, Ray start-up excluded) and the wall time of the command.
  3. (--latency WxH) one image encoded by `Predictor.encode` again and again in one process: the first
     call (one-time allocations and kernel selection) apart from the warm calls (median, min, max).
Random weights (no checkpoint): the speed is the same as with trained ones.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from interformer.config import CONFIGS, PreprocessConfig  # noqa: E402
from interformer.encode_engine import ENCODE_PRECISIONS, add_encode_engine_argument  # noqa: E402
from pipeline.encoding import EncoderSpec, EncoderStage, build_predictor, decode_stage, write_stage  # noqa: E402
from pipeline.feature_store import FeatureStore  # noqa: E402
from pipeline.staged_commits import StagedCommitter  # noqa: E402
from pipeline.sources import list_images  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from results_io import begin, save  # noqa: E402


def make_inputs(folder: Path, n: int) -> list[Path]:
    samples = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".jpg", ".png"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        src = samples[i % len(samples)]
        dst = folder / f"{i:04d}_{src.name}"
        shutil.copyfile(src, dst)
        paths.append(dst)
    return paths


def breakdown(folder: Path, spec: EncoderSpec, batch_size: int, workdir: Path) -> dict:
    """Seconds per stage for all images, run in this process as the job's stages."""
    sources = list_images(str(folder)).sources
    table = pa.table({"image_id": [s.image_id for s in sources], "uri": [s.uri for s in sources]})
    predictor = build_predictor(spec)
    stage = EncoderStage(spec, predictor.fingerprint)
    del predictor
    warm = decode_stage(table.slice(0, 1), spec.preprocess)
    t0 = time.perf_counter()
    stage(warm)  # first forward pass allocates (and, for openvino, converts or reads the model); not timed
    warm_up_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    decoded = [decode_stage(table.slice(i, 8), spec.preprocess) for i in range(0, table.num_rows, 8)]
    t_decode = time.perf_counter() - t0
    decoded = pa.concat_tables(decoded)

    t0 = time.perf_counter()
    encoded = [stage(decoded.slice(i, batch_size)) for i in range(0, decoded.num_rows, batch_size)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t_encode = time.perf_counter() - t0

    store = FeatureStore(str(workdir / "db"))
    committer = StagedCommitter(store)
    t0 = time.perf_counter()
    for batch in encoded:  # the job's write tasks: fragments written and staged ...
        write_stage(batch, store.features_uri, committer.uri, stage.fingerprint)
    committer.commit_staged()  # ... and the driver's exactly-once commit of what was staged
    t_write = time.perf_counter() - t0
    assert store.count() == table.num_rows
    nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store.features_uri) for f in fs)
    return {"decode_s": t_decode, "encode_s": t_encode, "write_s": t_write, "warm_up_s": warm_up_s,
            "encoder": stage.predictor.encoder.name, "images": table.num_rows,
            "bytes_per_image": nbytes / table.num_rows}


def encode_latency(spec: EncoderSpec, size: str, repeats: int) -> dict:
    """Seconds of `Predictor.encode` on one random WxH image: the first call, then `repeats` warm calls."""
    w, h = (int(v) for v in size.lower().split("x"))
    image = np.random.default_rng(1).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    predictor = build_predictor(spec)
    times = []
    for _ in range(1 + repeats):
        t0 = time.perf_counter()
        predictor.encode(image)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    warm = sorted(times[1:])
    return {"size": size, "first_call_s": round(times[0], 2), "warm_calls": repeats,
            "warm_median_s": round(float(np.median(warm)), 2) if warm else None,
            "warm_min_s": round(warm[0], 2) if warm else None, "warm_max_s": round(warm[-1], 2) if warm else None}


def run_job(folder: Path, args: argparse.Namespace, workdir: Path) -> dict:
    summary_path = workdir / "summary.json"
    cmd = [sys.executable, str(ROOT / "jobs" / "encode.py"), str(folder), "--db", str(workdir / "jobdb"),
           "--variant", args.variant, "--batch-size", str(args.batch_size), "--dtype", args.dtype,
           "--summary-json", str(summary_path), "--encode-engine", args.encode_engine, "--precision", args.precision]
    if args.engine_cache:
        cmd += ["--engine-cache", args.engine_cache]
    if args.max_side:
        cmd += ["--max-side", str(args.max_side)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"the encode job failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    return {"job_images_per_s": summary["images_per_s"], "job_pipeline_s": summary["seconds"], "job_wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(CONFIGS), default="light", help="model variant")
    p.add_argument("--images", type=int, default=16, help="number of input images (copies of the samples)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype")
    p.add_argument("--max-side", type=int, default=None, help="longest-side resize (default: native size)")
    add_encode_engine_argument(p)
    p.add_argument("--precision", choices=ENCODE_PRECISIONS, default="fp32", help="the encoder's arithmetic")
    p.add_argument("--engine-cache", default=None, metavar="DIR",
                   help="converted models of --encode-engine openvino (default: the user cache; a conversion the "
                   "cache lacks is made by the first measurement and reported as its warm-up)")
    p.add_argument("--skip-job", action="store_true", help="skip the end-to-end job run")
    p.add_argument("--latency", default=None, metavar="WxH",
                   help="also time Predictor.encode on one random WxH image: first call and warm calls")
    p.add_argument("--latency-repeats", type=int, default=4, help="warm calls for --latency (default: %(default)s)")
    p.add_argument("--json", default=None, help="raw results file (default: bench/results/bench_encode-UTC.json)")
    a = p.parse_args(argv)
    started = begin()

    workdir = Path(tempfile.mkdtemp(prefix="bench_enc_"))
    try:
        folder = workdir / "images"
        make_inputs(folder, a.images)
        spec = EncoderSpec(variant=a.variant, preprocess=PreprocessConfig(max_side=a.max_side), dtype=a.dtype,
                           precision=a.precision, engine=a.encode_engine, engine_cache=a.engine_cache)
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
        figures = {"variant": a.variant, "device": device, "batch_size": a.batch_size, "dtype": a.dtype,
                   "encode_engine": a.encode_engine, "precision": a.precision}
        if a.images:
            b = breakdown(folder, spec, a.batch_size, workdir)
            n = b["images"]
            total = b["decode_s"] + b["encode_s"] + b["write_s"]
            figures.update({"images": n, **{k: round(v, 3) if isinstance(v, float) else v for k, v in b.items()},
                            "in_process_images_per_s": round(n / total, 2)})
            print(f"{a.variant} on {device}, encoder {b['encoder']}, {n} images (samples, 451x300 to 640x427), "
                  f"batch {a.batch_size}, {a.dtype}")
            print("| stage | ms per image | share |\n|---|---|---|")
            for name in ("decode", "encode", "write"):
                secs = b[f"{name}_s"]
                print(f"| {name} | {secs / n * 1e3:.1f} | {secs / total:.0%} |")
            print(f"in process: {n / total:.2f} images/s; {b['bytes_per_image'] / 1e6:.2f} MB per image stored")
        if a.latency:
            figures["latency"] = lat = encode_latency(spec, a.latency, a.latency_repeats)
            print(f"Predictor.encode {a.latency}: first call {lat['first_call_s']} s, warm median {lat['warm_median_s']} s "
                  f"(min {lat['warm_min_s']}, max {lat['warm_max_s']}, {lat['warm_calls']} calls)")
        if a.images and not a.skip_job:
            job = run_job(folder, a, workdir)
            figures.update({k: round(v, 2) for k, v in job.items()})
            print(f"jobs/encode.py on a local Ray: {job['job_images_per_s']:.2f} images/s over the pipeline "
                  f"({job['job_pipeline_s']:.1f} s), {job['job_wall_s']:.1f} s for the whole command")
        save("bench_encode", figures, started, a.json)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
