"""Evaluate click-based segmentation on benchmarks with simulated clicks (RITM protocol, or InterFormer's).

Examples:
  python jobs/evaluate.py --baseline grabcut GrabCut Berkeley DAVIS --output runs/grabcut
  python jobs/evaluate.py --checkpoint interformer_light.pth GrabCut --output runs/light
  python jobs/evaluate.py --random-init small GrabCut --limit 5 --output runs/random-small --compare runs/grabcut

Every sample gets 20 clicks (the mIoU curve needs all of them; NoC equals RITM's early-stopped NoC because
the clicks are deterministic). Samples are spread over Ray workers (one segmenter per worker). Results are
appended to OUTPUT/results.jsonl as they arrive, so an interrupted run resumes where it stopped; at the end
the job writes results.csv, summary.json, summary.md and miou.png and prints the summary table.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # allow `python jobs/evaluate.py` from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from pipeline.baselines import GrabCutConfig  # noqa: E402
from pipeline.datasets import DatasetError, SampleRef, resolve  # noqa: E402
from pipeline.evaluation import PROTOCOLS, EvalConfig, SampleResult, append_results, pending, read_results  # noqa: E402
from pipeline.report import Row, format_table, plot_miou, summarize_run, write_csv  # noqa: E402
from pipeline.segmenters import SegmenterSpec  # noqa: E402

DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
RESULTS = "results.jsonl"
RUN_INFO = "run.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("datasets", nargs="*", metavar="DATASET",
                   help="benchmark name under --data-root (GrabCut, Berkeley, DAVIS), a dataset folder "
                        "(GrabCut data_GT/boundary_GT, DAVIS img/gt, or images/masks) or a COCO annotation .json")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--checkpoint", type=Path, help="InterFormer checkpoint file to evaluate")
    what.add_argument("--baseline", choices=["grabcut"], help="evaluate a classical baseline instead of a model")
    what.add_argument("--random-init", metavar="VARIANT",
                      help="evaluate a randomly initialised model of this variant (light, tiny, small, small_refine)")
    p.add_argument("--variant", help="expected variant of --checkpoint (an error if the file holds another)")
    p.add_argument("--init-seed", type=int, default=0,
                   help="torch seed for --random-init weights (default 0, as jobs/encode.py --seed)")
    p.add_argument("--device", help="torch device for the model (default: CUDA when available, else CPU)")
    p.add_argument("--max-side", type=int,
                   help="resize images so the longest side is at most this before the model (default: native size; "
                        "must match the encode job's --max-side when --feature-db is used)")
    p.add_argument("--feature-db", help="LanceDB root of stored features (jobs/encode.py --db) to read instead of "
                                        "encoding each image; rows must come from the same model and preprocessing")
    p.add_argument("--feature-table", default="features", help="feature table name under --feature-db (default features)")
    p.add_argument("--feature-id-prefix", default="",
                   help="prefix added to a sample's image file name to form its id in the feature table "
                        "(ids are paths relative to the folder that was encoded, e.g. 'data_GT/')")
    p.add_argument("--protocol", choices=PROTOCOLS, default="ritm",
                   help="click simulator and IoU: 'ritm' (standard, default) or 'interformer' (the InterFormer "
                        "repository's clicktest: padded canvas, random tie-break)")
    p.add_argument("--max-clicks", type=int, default=20, help="clicks per sample (default 20)")
    p.add_argument("--pred-thr", type=float, default=0.49,
                   help="RITM protocol: foreground when probability > this (default 0.49, RITM's)")
    p.add_argument("--seed", type=int, default=0, help="InterFormer protocol: tie-break seed (default 0)")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                   help=f"folder holding GrabCut/, Berkeley/, DAVIS/ (default {DEFAULT_DATA_ROOT})")
    p.add_argument("--coco-images", type=Path, help="image folder of a COCO annotation file given as DATASET")
    p.add_argument("--coco-min-area", type=float, default=0.0, help="COCO: skip instances smaller than this (pixels)")
    p.add_argument("--coco-include-crowd", action="store_true", help="COCO: also evaluate crowd regions")
    p.add_argument("--ignore-value", type=int,
                   help="generic images/masks folders: mask value to ignore (default: none; non-zero is object)")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples of each dataset (quick runs)")
    p.add_argument("--output", type=Path, help="output folder (default runs/NAME)")
    p.add_argument("--name", help="run name in tables and plots (default: baseline name, checkpoint stem or "
                                  "random-VARIANT, plus '-interformer' for that protocol)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in the output folder")
    p.add_argument("--compare", nargs="+", type=Path, default=[], metavar="RUN",
                   help="other runs (output folders or results.jsonl files) to add to the table and plot; "
                        "without a model option, only these are summarised")
    p.add_argument("--workers", type=int, help="Ray workers (default: the cluster's CPUs divided by --cpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs reserved per worker (default 0)")
    p.add_argument("--address", default="local",
                   help="Ray cluster: 'local' starts a private one for this job (default), 'auto' or HOST:PORT joins one")
    p.add_argument("--num-cpus", type=int, help="CPUs of the private local cluster (default: all)")
    args = p.parse_args(argv)
    has_model = args.checkpoint or args.baseline or args.random_init
    if not has_model and not args.compare:
        p.error("give --checkpoint, --baseline or --random-init (or --compare to summarise earlier runs)")
    if has_model and not args.datasets:
        p.error("name at least one DATASET to evaluate")
    if args.max_clicks < 1:
        p.error("--max-clicks must be at least 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


def build_spec(args: argparse.Namespace) -> SegmenterSpec:
    if args.baseline:
        return SegmenterSpec("grabcut", grabcut=GrabCutConfig())
    common = dict(device=args.device, max_side=args.max_side, feature_db=args.feature_db,
                  feature_table=args.feature_table, feature_id_prefix=args.feature_id_prefix)
    if args.random_init:
        return SegmenterSpec("random", variant=args.random_init, seed=args.init_seed, **common)
    return SegmenterSpec("checkpoint", checkpoint=str(args.checkpoint), variant=args.variant, **common)


def collect_samples(args: argparse.Namespace) -> list[SampleRef]:
    refs: list[SampleRef] = []
    for spec in args.datasets:
        found = resolve(spec, args.data_root, args.coco_images, args.ignore_value, args.coco_min_area,
                        args.coco_include_crowd)
        if not found:
            raise DatasetError(f"dataset {spec} has no samples")
        refs.extend(found[: args.limit] if args.limit else found)
    keys = [r.key for r in refs]
    if len(set(keys)) != len(keys):
        raise DatasetError("two datasets share a name; give them distinct folder names")
    return refs


def prepare_output(out: Path, info: dict[str, Any], overwrite: bool) -> list[SampleResult]:
    """Create the output folder, check it belongs to the same run, and return the results already there."""
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / RUN_INFO
    results_path = out / RESULTS
    if overwrite:
        results_path.unlink(missing_ok=True)
    elif info_path.exists():
        old = json.loads(info_path.read_text())
        if old != info:
            changed = sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k))
            raise SystemExit(
                f"{out} holds results of a different run (differs in: {', '.join(changed)}); "
                "use another --output or --overwrite"
            )
    info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return read_results(results_path, repair=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ray(args: argparse.Namespace, spec: SegmenterSpec, config: EvalConfig, todo: list[SampleRef],
               results_path: Path) -> list[tuple[tuple[str, str], str]]:
    """Evaluate `todo` on Ray workers, appending each result to `results_path`; returns the failures."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    if args.address == "local":
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=free_port())
    else:
        ray.init(address=args.address, log_to_driver=False)
    try:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        n = args.workers or max(1, int(cpus // max(args.cpus_per_worker, 1e-3)))
        n = max(1, min(n, len(todo)))
        worker_cls = ray.remote(EvalWorker).options(num_cpus=args.cpus_per_worker, num_gpus=args.gpus_per_worker)
        threads = max(1, int(args.cpus_per_worker))
        pool = ActorPool([worker_cls.remote(spec, config, threads) for _ in range(n)])
        failures = []
        with tqdm(total=len(todo), desc=f"evaluating on {n} workers", unit="sample") as bar:
            for status, key, payload in pool.map_unordered(lambda a, ref: a.run.remote(ref), todo):
                if status == "ok":
                    append_results(results_path, [payload])
                else:
                    failures.append((key, payload))
                    bar.write(f"FAILED {key[0]}/{key[1]}: {payload.splitlines()[-1]}")
                bar.update(1)
        return failures
    finally:
        ray.shutdown()


class EvalWorker:
    """A Ray actor holding one segmenter; evaluates samples one at a time."""

    def __init__(self, spec: SegmenterSpec, config: EvalConfig, threads: int) -> None:
        import cv2
        import torch

        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        self.segmenter = spec.build()
        self.config = config

    def run(self, ref: SampleRef) -> tuple[str, tuple[str, str], Any]:
        from pipeline.evaluation import evaluate_ref

        try:
            return "ok", ref.key, evaluate_ref(self.segmenter, ref, self.config)
        except Exception:
            return "error", ref.key, traceback.format_exc()


def load_run(path: Path) -> tuple[str, list[SampleResult], int]:
    """(name, results, max_clicks) of an earlier run given by its folder or results file."""
    folder, file = (path, path / RESULTS) if path.is_dir() else (path.parent, path)
    if not file.exists():
        raise SystemExit(f"no results at {file}")
    info_path = folder / RUN_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    results = read_results(file)
    max_clicks = info.get("eval", {}).get("max_clicks") or min(len(r.ious) for r in results)
    return info.get("name", folder.name), results, max_clicks


def report(rows: list[Row], out: Path | None, results: list[SampleResult] | None) -> None:
    table = format_table(rows)
    print(table)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.md", out / "summary.json", out / "miou.png"]
    if results:
        write_csv(results, out / "results.csv")
        written.insert(0, out / "results.csv")
    written[-3].write_text(format_table(rows, markdown=True) + "\n")
    written[-2].write_text(json.dumps(
        [{"run": r.run, "dataset": r.dataset, **r.summary.to_dict()} for r in rows], indent=2) + "\n")
    plot_miou(rows, written[-1])
    print("wrote " + ", ".join(str(p) for p in written))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[Row] = []
    out = args.output
    results: list[SampleResult] | None = None
    failures = []
    if args.checkpoint or args.baseline or args.random_init:
        try:
            spec = build_spec(args)
            config = EvalConfig(args.protocol, args.max_clicks, args.pred_thr, args.seed)
            refs = collect_samples(args)
        except (ValueError, DatasetError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        name = args.name or spec.default_name + ("-interformer" if args.protocol == "interformer" else "")
        out = args.output or Path("runs") / name
        info = {"name": name, "segmenter": spec.to_dict(), "eval": config.to_dict()}
        done = prepare_output(out, info, args.overwrite)
        wanted = {r.key for r in refs}
        todo = list(pending(refs, (r.key for r in done)))
        print(f"{name}: {len(refs)} samples, {len(refs) - len(todo)} already in {out / RESULTS}, {len(todo)} to run")
        if todo:
            failures = run_on_ray(args, spec, config, todo, out / RESULTS)
        results = [r for r in read_results(out / RESULTS) if r.key in wanted]
        if results:
            rows.extend(summarize_run(name, results, args.max_clicks))
    for path in args.compare:
        if out is not None and results is not None and path.resolve() in (out.resolve(), (out / RESULTS).resolve()):
            continue  # already summarised as this run
        other_name, other_results, other_clicks = load_run(path)
        rows.extend(summarize_run(other_name, other_results, other_clicks))
    if rows:
        report(rows, out, results)
    if failures:
        print(f"{len(failures)} samples failed (not in the results; rerun to retry):", file=sys.stderr)
        for (ds, sid), tb in failures:
            print(f"  {ds}/{sid}: {tb.strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
