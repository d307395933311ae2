"""Evaluate click-based segmentation on benchmarks with simulated clicks (RITM protocol, or InterFormer's).

Examples:
  interformer-evaluate --baseline grabcut GrabCut Berkeley DAVIS --output runs/grabcut
  interformer-evaluate --checkpoint interformer_light.pth GrabCut --output runs/light
  interformer-evaluate --random-init small GrabCut --limit 5 --output runs/random-small --compare runs/grabcut

Every sample gets 20 clicks (the mIoU curve needs all of them; NoC equals RITM's early-stopped NoC because
the clicks are deterministic). Samples are spread over Ray workers (one segmenter per worker). Results are
appended to OUTPUT/results.jsonl as they arrive, so an interrupted run resumes where it stopped; at the end
the job writes results.csv, summary.json, summary.md and miou.png and prints the summary table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.ray_runtime import RayStartError, prepare_job_process

prepare_job_process("jobs/evaluate.py")  # before the imports that need the project's packages

from pipeline.baselines import GrabCutConfig  # noqa: E402
from pipeline.datasets import DatasetError, default_data_root  # noqa: E402
from pipeline.evaluation import PROTOCOLS, EvalConfig  # noqa: E402
from pipeline.evaluation_run import (  # noqa: E402
    DatasetSelection, RunFolderError, WorkerPlacement, collect_samples, is_same_run, load_run, run_evaluation,
    write_reports)
from pipeline.report import Row, format_table, summarize_run  # noqa: E402
from pipeline.segmenters import SegmenterSpec  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="interformer-evaluate",
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
    p.add_argument("--data-root", type=Path, default=default_data_root(),
                   help="folder holding GrabCut/, Berkeley/, DAVIS/ (default: %(default)s, the shared/data beside "
                        "the project checkout, whatever the current folder)")
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
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto', HOST:PORT); default: the cluster of a `ray job submit` "
                        "(RAY_ADDRESS), else a private local Ray ('local' forces one)")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[Row] = []
    out, results, failures = args.output, None, []
    try:
        if args.checkpoint or args.baseline or args.random_init:
            try:
                spec = build_spec(args)
                config = EvalConfig(args.protocol, args.max_clicks, args.pred_thr, args.seed)
            except ValueError as e:
                raise DatasetError(str(e)) from None
            refs = collect_samples(DatasetSelection(args.datasets, args.data_root, args.coco_images, args.ignore_value,
                                                    args.coco_min_area, args.coco_include_crowd, args.limit))
            name = args.name or spec.default_name + ("-interformer" if args.protocol == "interformer" else "")
            out = args.output or Path("runs") / name
            placement = WorkerPlacement(args.workers, args.cpus_per_worker, args.gpus_per_worker, args.address,
                                        args.num_cpus)
            outcome = run_evaluation(name, spec, config, refs, out, placement, args.overwrite)
            results, failures = outcome.results, outcome.failures
            rows.extend(summarize_run(name, results, args.max_clicks) if results else [])
        rows.extend(row for path in args.compare if results is None or not is_same_run(path, out)
                    for row in summarize_run(*load_run(path)))
    except (DatasetError, RunFolderError, RayStartError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rows:
        print(format_table(rows))
        if out is not None:
            print("wrote " + ", ".join(str(p) for p in write_reports(rows, out, results)))
    for (ds, sid), tb in failures:
        print(f"sample {ds}/{sid} failed (not in the results; rerun to retry): {tb.strip().splitlines()[-1]}",
              file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
