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
import signal
import sys
from pathlib import Path

from pipeline.ray_runtime import RayStartError, prepare_job_process

prepare_job_process("jobs/evaluate.py")  # before the imports that need the project's packages

from pipeline import evaluation_cli  # noqa: E402
from pipeline.actor_pool import ClusterStalled, WorkerStartError  # noqa: E402
from pipeline.datasets import DatasetError  # noqa: E402
from pipeline.evaluation_run import (  # noqa: E402
    DatasetSelection, PlacementError, RunFolderError, WorkerPlacement, collect_samples, compare_rows, run_evaluation,
    write_reports)
from pipeline.evaluation_report import format_table, summarize_run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return evaluation_cli.parse_args("interformer-evaluate", __doc__, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec, config = args.spec, args.eval_config
    out, results, failures, rows = args.output, None, [], []
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM stops the run as Ctrl-C does
    try:
        if spec is not None:
            refs = collect_samples(DatasetSelection(args.datasets, args.data_root, args.coco_images, args.ignore_value,
                                                    args.coco_min_area, args.coco_include_crowd, args.limit))
            name = args.name or spec.default_name + ("-interformer" if args.protocol == "interformer" else "")
            out = args.output or Path("runs") / name
        compared = compare_rows(args.compare, this_run=out if spec is not None else None)
        if spec is not None:
            placement = WorkerPlacement(args.workers, args.cpus_per_worker, args.gpus_per_worker, args.address,
                                        args.num_cpus, args.stall_timeout)
            outcome = run_evaluation(name, spec, config, refs, out, placement, args.overwrite)
            results, failures = outcome.results, outcome.failures
            rows = summarize_run(name, results, args.max_clicks) if results else []
    except (DatasetError, PlacementError, RunFolderError, RayStartError, WorkerStartError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ClusterStalled as e:
        print(f"error: {e}; the finished samples are kept in {out}/results.jsonl: run again with the same options "
              "to resume once the cluster has workers", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nevaluate: stopped; the finished samples are kept in {out}/results.jsonl: run again with the same "
              "options to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows += compared
    if rows:
        print(format_table(rows))
        if out is not None:
            print("wrote " + ", ".join(str(p) for p in write_reports(rows, out, results)))
    for (ds, sid), tb in failures:
        print(f"sample {ds}/{sid} failed (not in the results; rerun to retry): {tb.strip().splitlines()[-1]}",
              file=sys.stderr)
    return 1 if failures else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
