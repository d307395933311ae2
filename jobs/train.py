"""Train or fine-tune InterFormer on COCO / LVIS / Label Studio / image+mask data with Ray Train.

Follows the official recipe (spec §6): random resize 0.5-2.0, flip, pad + random crop, photometric
distortion, one random object per sample; iterative click simulation (P(k) ∝ 0.6^k extra clicks, predictions
fed back into the reference labels); NFL on the decode head + 0.4 x NFL on the auxiliary head; AdamW with
layer-wise lr decay; poly schedule with linear warm-up.

    # fine-tune the official Light model on a Label Studio export, 2 GPU workers
    python jobs/train.py --out-dir runs/ft --init iter_320000.pth --variant light \
        --data labelstudio:export.json,images=/ls/media --max-iters 4000 --warmup-iters 200 --num-workers 2

    # cheap CPU fine-tuning of I-MSA + heads on features already in the feature table
    python jobs/train.py --out-dir runs/ft --init iter_320000.pth --variant light --frozen-backbone \
        --features lancedb --data folder:images,masks=masks

Rerunning the same command resumes from the newest checkpoint in --out-dir (same schedule position).
Checkpoints (<out-dir>/checkpoints/iter_N.pth) load with `interformer.load_model` and, by layout, with the
official code. With several workers on several machines --out-dir must be on storage they all see.
"""
from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from interformer.training.cli import add_dataclass_arguments, build_dataclass  # noqa: E402
from interformer.training.config import TrainConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/train.py",
        description="Train / fine-tune InterFormer with Ray Train (spec §6 recipe); rerun to resume.",
    )
    add_dataclass_arguments(p, TrainConfig)
    run = p.add_argument_group("where it runs")
    run.add_argument("--local", action="store_true",
                     help="run one worker in this process, without Ray (debugging, tests)")
    run.add_argument("--address", default=None,
                     help="Ray cluster address to join (default: start a private local Ray instance)")
    run.add_argument("--max-failures", type=int, default=0,
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


def make_evaluator(cfg: TrainConfig, device: Any):
    """NoC on the held-out set with the evaluation job's code (pipeline.evaluation), on a copy of the model."""
    from tqdm import tqdm

    from interformer.predictor import Predictor
    from pipeline.datasets import resolve
    from pipeline.evaluation import EvalConfig, evaluate_ref
    from pipeline.metrics import mean_noc, miou_at
    from pipeline.segmenters import ModelSegmenter

    refs = resolve(cfg.eval_data, cfg.eval_data_root)
    if cfg.eval_max_samples is not None:
        refs = refs[: cfg.eval_max_samples]
    econf = EvalConfig(protocol=cfg.eval_protocol, max_clicks=cfg.eval_clicks, seed=cfg.seed)

    def evaluate(model) -> dict[str, Any]:
        segmenter = ModelSegmenter(Predictor(copy.deepcopy(model), device=device))
        results = [evaluate_ref(segmenter, r, econf) for r in tqdm(refs, desc="eval", leave=False)]
        ious = [r.ious for r in results]
        return {
            "dataset": cfg.eval_data, "protocol": cfg.eval_protocol, "samples": len(results),
            "noc85": round(mean_noc(ious, 0.85, cfg.eval_clicks), 4),
            "noc90": round(mean_noc(ious, 0.90, cfg.eval_clicks), 4),
            "miou1": round(miou_at(ious, 1), 4),
            "miou5": round(miou_at(ious, min(5, cfg.eval_clicks)), 4),
        }

    return evaluate


class StoredFeatureFetch:
    """Opens a FeatureReader on first use (in whichever process reads samples) and fetches pyramids by id."""

    def __init__(self, root: str, table: str, fingerprint: str) -> None:
        self.root, self.table, self.fingerprint = root, table, fingerprint

    def __call__(self):
        from pipeline.feature_store import FeatureReader

        return FeatureReader(self.root, self.fingerprint, table=self.table).get


def feature_stream(cfg: TrainConfig, rank: int, world_size: int):
    """The frozen-backbone sample stream over the feature table, after checking its fingerprint."""
    import torch

    from interformer.config import PreprocessConfig
    from interformer.training.feature_stream import FeatureSampleStream, collate_by_size
    from interformer.training.init import initial_model
    from interformer.training.trainer import open_sources
    from pipeline.feature_store import FeatureStore

    fingerprint = cfg.features_fingerprint
    if fingerprint is None:
        torch.manual_seed(cfg.seed)
        fingerprint = initial_model(cfg.variant, cfg.init)[0].fingerprint(PreprocessConfig())
    found = FeatureStore(cfg.features, cfg.features_table).fingerprints()
    if fingerprint not in found:
        raise SystemExit(f"the feature table {cfg.features}/{cfg.features_table} has no features of encoder "
                         f"{fingerprint!r}; it holds {found or 'nothing'} (encode with the same --init, or give "
                         f"--features-fingerprint)")
    stream = FeatureSampleStream(open_sources(cfg), StoredFeatureFetch(cfg.features, cfg.features_table, fingerprint),
                                 cfg.augment.crop_size, cfg.seed, rank, world_size)
    return stream, collate_by_size


def run_local(cfg: TrainConfig) -> dict[str, Any]:
    """One worker in this process (no Ray)."""
    import torch

    from interformer.training.trainer import WorkerContext, run_worker

    torch.set_num_threads(cfg.cpus_per_worker)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    stream, collate = feature_stream(cfg, 0, 1) if cfg.features else (None, None)
    evaluator = make_evaluator(cfg, device) if cfg.eval_interval else None
    return run_worker(cfg, WorkerContext(device=device), evaluator, stream, collate)


def sync_batchnorm(module, device):
    """The official heads use SyncBN across GPUs; do the same for several CUDA workers (same state-dict keys)."""
    import torch

    if device.type != "cuda":
        return module
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)


def ray_worker_loop(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from interformer.training.trainer import WorkerContext, run_worker

    cfg: TrainConfig = config["cfg"]
    torch.set_num_threads(cfg.cpus_per_worker)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    ctx = WorkerContext(
        rank=rank, world_size=world, device=device,
        wrap=lambda m: ray.train.torch.prepare_model(sync_batchnorm(m, device)),
        barrier=(lambda: dist.barrier()) if world > 1 else None,
        progress=False,
    )
    stream, collate = feature_stream(cfg, rank, world) if cfg.features else (None, None)
    evaluator = make_evaluator(cfg, device) if cfg.eval_interval and rank == 0 else None
    run_worker(cfg, ctx, evaluator, stream, collate)


class LogProgress:
    """A driver-side progress bar fed from the run's log.csv while Ray workers train (their own output goes
    to the Ray logs, which also keeps Ray Train's internal warnings off the console)."""

    def __init__(self, cfg: TrainConfig, poll_s: float = 2.0) -> None:
        from interformer.training.runlog import LOG_FIELDS, CsvLog, list_checkpoints

        self.cfg, self.poll_s = cfg, poll_s
        done = list_checkpoints(Path(cfg.out_dir))
        self.start = done[-1][0] if done else 0
        CsvLog(Path(cfg.out_dir) / "log.csv", LOG_FIELDS).truncate_after(self.start)  # rows of a killed run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "LogProgress":
        print(f"[train] {'resuming at iteration ' + str(self.start) if self.start else 'starting'}; "
              f"Ray workers log to the Ray session folder; progress from {self.cfg.out_dir}/log.csv", flush=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from tqdm import tqdm

        with tqdm(total=self.cfg.last_iter, initial=self.start, desc="train", dynamic_ncols=True) as bar:
            while True:
                stopping = self._stop.wait(self.poll_s)
                row = last_log_row(self.cfg)
                if row and int(row["iter"]) > bar.n:
                    bar.update(int(row["iter"]) - bar.n)
                    bar.set_postfix(loss=row["loss"], lr=row["lr"])
                if stopping:
                    return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ray(cfg: TrainConfig, address: str | None, max_failures: int) -> None:
    """TorchTrainer with cfg.num_workers workers: one GPU each when the cluster has GPUs, else CPU workers."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if address is None:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.num_workers * cfg.cpus_per_worker),
                 include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}},
                 _metrics_export_port=free_port(), log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
        resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        trainer = TorchTrainer(
            ray_worker_loop,
            train_loop_config={"cfg": cfg},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name="train", storage_path=str(Path(cfg.out_dir).resolve() / "ray"),
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        with LogProgress(cfg):
            result = trainer.fit()
        if result.error is not None:
            raise SystemExit(f"training failed: {result.error}")
        print(f"[train] done: {last_log_row(cfg)}", flush=True)
    finally:
        if address is None:
            ray.shutdown()


def last_log_row(cfg: TrainConfig) -> dict[str, str]:
    from interformer.training.runlog import LOG_FIELDS, CsvLog

    rows = CsvLog(Path(cfg.out_dir) / "log.csv", LOG_FIELDS).rows()
    return rows[-1] if rows else {}


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_config(argv)
    if args.local:
        summary = run_local(cfg)
        print(f"[train] done: iterations {summary['start_iter']} -> {summary['end_iter']}; {last_log_row(cfg)}",
              flush=True)
    else:
        run_ray(cfg, args.address, args.max_failures)


if __name__ == "__main__":
    main()
