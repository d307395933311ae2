"""Train or fine-tune InterFormer on COCO / LVIS / Label Studio / image+mask data with Ray Train.

Follows the official recipe (spec §6): random resize 0.5-2.0, flip, pad + random crop, photometric
distortion, one random object per sample; iterative click simulation (P(k) ∝ 0.6^k extra clicks, predictions
fed back into the reference labels); NFL on the decode head + 0.4 x NFL on the auxiliary head; AdamW with
layer-wise lr decay; poly schedule with linear warm-up.

    # fine-tune the official Light model on a Label Studio export, 2 GPU workers
    interformer-train --out-dir runs/ft --init iter_320000.pth --variant light \
        --data labelstudio:export.json,images=/ls/media --max-iters 4000 --warmup-iters 200 --num-workers 2

    # cheap CPU fine-tuning of I-MSA + heads on features already in the feature table
    interformer-train --out-dir runs/ft --init iter_320000.pth --variant light --frozen-backbone \
        --features lancedb --data folder:images,masks=masks

Rerunning the same command resumes from the newest checkpoint in --out-dir (same schedule position); with
--deterministic (or 1 CPU per worker) the resumed run computes exactly what an uninterrupted one would. One
process writes a run folder at a time: a second run in the same --out-dir is refused while the first lives.
Checkpoints (<out-dir>/checkpoints/iter_N.pth) load with `interformer.load_model` and, by layout, with the
official code. With several workers on several machines --out-dir must be on storage they all see.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from pipeline.ray_runtime import RayStartError, prepare_job_process

prepare_job_process("jobs/train.py")  # before the imports that need the project's packages

from interformer.checkpoint import CheckpointError  # noqa: E402
from interformer.cli_types import integer  # noqa: E402
from interformer.training.cli import add_dataclass_arguments, build_dataclass  # noqa: E402
from interformer.training.config import TrainConfig  # noqa: E402
from interformer.training.data import DataError  # noqa: E402
from interformer.training.launch import TrainingFailed  # noqa: E402
from interformer.training.run_lock import RunFolderBusy, RunFolderLock  # noqa: E402
from interformer.training.runlog import NonFiniteWeights, ScheduleChanged  # noqa: E402
from interformer.training.step import TrainingDiverged  # noqa: E402
from interformer.training.trainer import stopped_message  # noqa: E402
from pipeline.datasets import DatasetError  # noqa: E402
from pipeline.training_run import FeatureTableError, run_local, run_on_ray  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="interformer-train",
        description="Train / fine-tune InterFormer with Ray Train (spec §6 recipe); rerun to resume.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(p, TrainConfig)
    run = p.add_argument_group("where it runs")
    run.add_argument("--local", action="store_true",
                     help="run one worker in this process, without Ray (debugging, tests)")
    run.add_argument("--address", default=None,
                     help="Ray cluster to join (default: the cluster of a `ray job submit` (RAY_ADDRESS), else a "
                          "private local Ray)")
    run.add_argument("--max-failures", type=integer(-1), default=0,
                     help="Ray Train restarts after a worker failure; each restart resumes from the newest "
                          "checkpoint (default: 0)")
    return p


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = build_dataclass(TrainConfig, vars(args)).with_absolute_paths()
    except ValueError as e:
        parser.error(str(e))
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM stops a run as Ctrl-C does
    try:
        with RunFolderLock(cfg.out_dir):  # a clear refusal before any start-up while another run writes there
            pass
        if args.local:
            summary = run_local(cfg)
            last = f"iterations {summary['start_iter']} -> {summary['end_iter']}; {summary.get('last', {})}"
        else:
            last = run_on_ray(cfg, args.address, args.max_failures)
    except (RunFolderBusy, DatasetError, DataError, ScheduleChanged, FeatureTableError, RayStartError, TrainingFailed,
            CheckpointError, TrainingDiverged, NonFiniteWeights) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{stopped_message(Path(cfg.out_dir))}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"[train] done: {last}", flush=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
