"""Where the training loop runs: one worker in this process, or Ray Train workers (DDP) on a cluster.

What a worker needs from outside the model package comes in as `WorkerHooks`: the held-out evaluator and
the stored-feature sample stream are built on the pipeline side (`pipeline.training_run`), so this package
imports nothing above it. Ray itself must be initialised by the caller before `run_ray_train`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import TrainConfig
from .run_lock import RunFolderLock
from .runlog import LOG_FIELDS, CsvLog, list_checkpoints
from .trainer import Evaluator, WorkerContext, run_worker

RAY_LOCK_WAIT_S = 60.0  # a restarted Ray Train worker waits this long for its failed predecessor to exit


class TrainingFailed(RuntimeError):
    """Ray Train gave up on the run (a worker raised, or failed more than --max-failures times)."""


@dataclass(frozen=True)
class WorkerHooks:
    """Builders a worker calls with its config: `evaluator(cfg, device)` on rank 0 when cfg.eval_interval is
    set, and `sample_stream(cfg, rank, world_size)` -> (dataset, collate) or (None, None) for image samples.
    Both must be picklable (module-level functions) to reach Ray workers."""

    evaluator: Callable[[TrainConfig, torch.device], Evaluator] | None = None
    sample_stream: Callable[[TrainConfig, int, int], tuple[Any, Any]] | None = None

    def build(self, cfg: TrainConfig, rank: int, world: int, device: torch.device) -> tuple[Any, Any, Any]:
        stream, collate = self.sample_stream(cfg, rank, world) if self.sample_stream else (None, None)
        evaluator = self.evaluator(cfg, device) if self.evaluator and cfg.eval_interval and rank == 0 else None
        return evaluator, stream, collate


def run_local(cfg: TrainConfig, hooks: WorkerHooks = WorkerHooks()) -> dict[str, Any]:
    """One worker in this process (no Ray)."""
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    evaluator, stream, collate = hooks.build(cfg, 0, 1, device)
    return run_worker(cfg, WorkerContext(device=device), evaluator, stream, collate)


def sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The official heads use SyncBN across GPUs; do the same for several CUDA workers (same state-dict keys)."""
    if device.type != "cuda":
        return module
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)


def ray_worker_loop(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg: TrainConfig = config["cfg"]
    hooks: WorkerHooks = config["hooks"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    ctx = WorkerContext(
        rank=rank, world_size=world, device=device,
        wrap=lambda m: ray.train.torch.prepare_model(sync_batchnorm(m, device)),
        barrier=(lambda: dist.barrier()) if world > 1 else None,
        progress=False,
        lock_wait_s=RAY_LOCK_WAIT_S,
    )
    evaluator, stream, collate = hooks.build(cfg, rank, world, device)
    run_worker(cfg, ctx, evaluator, stream, collate)


def run_ray_train(cfg: TrainConfig, max_failures: int, hooks: WorkerHooks = WorkerHooks()) -> dict[str, str]:
    """TorchTrainer with cfg.num_workers workers (one GPU each when the cluster has GPUs, else CPU workers) on
    the Ray cluster this process is connected to; returns the last log.csv row."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        ray_worker_loop,
        train_loop_config={"cfg": cfg, "hooks": hooks},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="train", storage_path=str(Path(cfg.out_dir).resolve() / "ray"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    with LogProgress(cfg):
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:  # Train v2 raises: WorkerGroupError, ControllerError
            raise TrainingFailed(f"training failed: {failure_message(e)}") from None
        except SystemExit:  # Ray Train's own Ctrl-C handler aborts the run and leaves the driver by SystemExit
            raise KeyboardInterrupt from None
    if getattr(result, "error", None) is not None:  # Train v1 returned the error in the result
        raise TrainingFailed(f"training failed: {failure_message(result.error)}")
    return last_log_row(cfg)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception behind a Ray wrapper (RayTaskError.cause, __cause__ chains)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def _one_line(exc: BaseException) -> str:
    """`Type: message` of an exception, without a traceback Ray may have folded into its text."""
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].startswith("Traceback"):
        text = lines[-1]
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"


def failure_message(error: BaseException) -> str:
    """What went wrong in a failed Ray Train run: each failed worker's root cause, one line each."""
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"worker {rank}: {_one_line(root_cause(e))}" for rank, e in sorted(failures.items()))
    controller = getattr(error, "controller_failure", None)
    if isinstance(controller, BaseException):
        return _one_line(root_cause(controller))
    return _one_line(root_cause(error))


class LogProgress:
    """A driver-side progress bar fed from the run's log.csv while Ray workers train (their own output goes
    to the Ray logs, which also keeps Ray Train's internal warnings off the console)."""

    def __init__(self, cfg: TrainConfig, poll_s: float = 2.0) -> None:
        self.cfg, self.poll_s = cfg, poll_s
        done = list_checkpoints(Path(cfg.out_dir))
        self.start = done[-1][0] if done else 0
        with RunFolderLock(cfg.out_dir):  # refused while an earlier run's worker still writes
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


def last_log_row(cfg: TrainConfig) -> dict[str, str]:
    rows = CsvLog(Path(cfg.out_dir) / "log.csv", LOG_FIELDS).rows()
    return rows[-1] if rows else {}
