"""The per-worker training loop: build or resume the model, stream samples, step, log, checkpoint, evaluate.

It runs the same in a Ray Train worker (`jobs/train.py`; DDP when there are several workers) and in a plain
process (`jobs/train.py --local`, the tests). Resuming is by iteration: the newest checkpoint in the run
folder gives the model, the optimiser state and the iteration; the lr schedule, the sample stream and the
per-iteration random generators are functions of the iteration, so a resumed run continues exactly where
the killed one would have been.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import CheckpointError
from ..config import get_config
from ..modeling import InterFormer
from .config import SCHEDULE_FIELDS, TrainConfig
from .data import ConcatSource, TrainSource
from .init import initial_model
from .optim import build_optimizer, set_lr
from .plot import has_rows, plot_loss
from .run_lock import RunFolderLock, close_inherited_locks
from .runlog import (EVAL_FIELDS, LOG_FIELDS, CsvLog, check_resume_config, list_checkpoints,
                     load_training_checkpoint, remove_stale_temporaries, save_training_checkpoint)
from .step import TrainForward, TrainingDiverged, training_step
from .stream import RangeSampler, SampleStream

Evaluator = Callable[[InterFormer], dict[str, Any]]


@dataclass
class WorkerContext:
    """Where this worker sits: rank among world_size, its device, and hooks into the surrounding framework."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None  # e.g. DDP via ray.train.torch.prepare_model
    barrier: Callable[[], None] | None = None
    progress: bool = True  # a tqdm bar on rank 0 (off under Ray: the driver shows progress from log.csv)
    lock_wait_s: float = 0.0  # how long rank 0 waits for an earlier writer of the run folder to exit


def iteration_rng(seed: int, rank: int, iteration: int) -> np.random.Generator:
    """The click-simulation generator of one iteration on one worker."""
    return np.random.default_rng([seed, 2, rank, iteration])


def seed_torch_for(seed: int, rank: int, iteration: int) -> None:
    """Seed torch (dropout, drop path) from the iteration, so a resumed run draws what the original would."""
    torch.manual_seed(int(np.random.default_rng([seed, 3, rank, iteration]).integers(2 ** 62)))


def open_sources(cfg: TrainConfig) -> TrainSource:
    sources = [spec.open() for spec in cfg.data]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


def _collate_images(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    imgs, labels = zip(*batch)
    return [(torch.stack(imgs), torch.stack(labels), None)]


@contextmanager
def torch_settings(cfg: TrainConfig):
    """Torch threads (`cpus_per_worker`, or 1 with `deterministic`) and deterministic algorithms for the
    duration of a run; the caller's settings come back afterwards.

    With several intra-op threads, CPU reductions can add in a different order from run to run, so two
    identical runs drift apart after a few iterations; one thread and deterministic kernels make a run, and a
    resumed run, bit-identical to any other run of the same settings."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1 if cfg.deterministic else cfg.cpus_per_worker)
    torch.use_deterministic_algorithms(cfg.deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def run_worker(cfg: TrainConfig, ctx: WorkerContext = WorkerContext(), evaluator: Evaluator | None = None,
               sample_stream: torch.utils.data.Dataset | None = None,
               collate: Callable | None = None) -> dict[str, Any]:
    """Train from the run folder's newest checkpoint (or from `cfg.init`) up to `cfg.last_iter`.

    `sample_stream`/`collate` replace the image stream (e.g. stored features, which yields pyramids); by
    default samples are augmented images from `cfg.data`. Returns a summary (iterations done, last metrics).
    Rank 0 holds the run folder's writer lock throughout (RunFolderBusy when another process has it).
    """
    lock = RunFolderLock(cfg.out_dir) if ctx.rank == 0 else None
    if lock is not None:
        lock.acquire(ctx.lock_wait_s)
        remove_stale_temporaries(Path(cfg.out_dir))
    try:
        with torch_settings(cfg):
            return _train(cfg, ctx, evaluator, sample_stream, collate)
    finally:
        if lock is not None:
            lock.release()


def evaluate(evaluator: Evaluator, model: InterFormer, iteration: int, eval_log: CsvLog) -> dict[str, Any]:
    """Run the held-out evaluation of the model at `iteration` and append its eval.csv row."""
    t_eval = time.perf_counter()
    result = evaluator(model)
    result.update(iter=iteration, sec=time.perf_counter() - t_eval)
    eval_log.append([result])
    print(f"[eval] iteration {iteration}: " + ", ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    return result


def evaluation_due(cfg: TrainConfig, done: int) -> bool:
    """Whether the run evaluates after iteration `done`: a multiple of --eval-interval, or the end of the schedule
    (not --stop-at: a stopped session evaluates as a straight run would)."""
    return bool(cfg.eval_interval) and done > 0 and (done % cfg.eval_interval == 0 or done == cfg.max_iters)


def checkpoint_due(cfg: TrainConfig, done: int) -> bool:
    """Whether the run writes a checkpoint after iteration `done`: every --checkpoint-interval, at the end of the
    session, and before every evaluation, so that a stop never loses more than the iterations since the last
    evaluation. A function of the config alone, so every worker of a multi-worker run agrees (the barrier)."""
    return done % cfg.checkpoint_interval == 0 or done == cfg.last_iter or evaluation_due(cfg, done)


def missed_evaluation(cfg: TrainConfig, start: int, eval_log: CsvLog) -> bool:
    """Whether the checkpoint a run resumes from sits at an evaluation point (a multiple of --eval-interval, or
    the end of the schedule) without its eval.csv row: the checkpoint is written before the evaluation, so a
    kill during the evaluation loses the row, and the resumed run must evaluate that checkpoint first."""
    if not evaluation_due(cfg, start):
        return False
    return not any(r.get("iter") == str(start) for r in eval_log.rows())


def _named(title: str, keys: Sequence[str], shown: int = 3) -> str:
    return f"{len(keys)} {title} ({', '.join(keys[:shown])}{' ...' if len(keys) > shown else ''})"


def check_resume_state(cfg: TrainConfig, path: Path, state: dict[str, Any]) -> None:
    """CheckpointError, in one line, unless the checkpoint a run resumes from fits this run: its state dict has the
    keys and shapes of InterFormer-`cfg.variant`, and its optimiser state the parameter groups this run builds.
    The model is laid out on the meta device, so the driver checks this before any worker starts."""
    with torch.device("meta"):
        model = InterFormer(get_config(cfg.variant))
    if cfg.frozen_backbone:
        model.backbone.requires_grad_(False)
    own, sd = model.state_dict(), state["state_dict"]
    problems = [_named(title, keys) for title, keys in (
        ("missing keys", [k for k in own if k not in sd]),
        ("unexpected keys", [k for k in sd if k not in own]),
        ("mis-shaped tensors", [k for k in sd if k in own and getattr(sd[k], "shape", None) != own[k].shape]),
    ) if keys]
    if problems:
        raise CheckpointError(f"{path} does not fit InterFormer-{cfg.variant}: {'; '.join(problems)}; move it out of "
                              "the run folder or use another --out-dir")
    optimizer = build_optimizer(model, cfg.optim, model.config.vit.depth, model.config.layer_decay_rate)
    groups = state["optimizer"].get("param_groups") if isinstance(state["optimizer"], dict) else None
    theirs = [len(g.get("params", ())) for g in groups if isinstance(g, dict)] if isinstance(groups, list) else None
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if theirs != ours:
        raise CheckpointError(f"{path}: its optimiser state has parameter groups of sizes {theirs}, this run builds "
                              f"{ours}; it is not a checkpoint of this run's settings (move it out of the run folder "
                              "or use another --out-dir)")


def check_resume_checkpoint(cfg: TrainConfig) -> None:
    """Check the newest checkpoint of the run folder, the one a run resumes from (CheckpointError); nothing to
    check for a fresh run folder."""
    checkpoints = list_checkpoints(Path(cfg.out_dir))
    if checkpoints:
        path = checkpoints[-1][1]
        check_resume_state(cfg, path, load_training_checkpoint(path))


def diverged_message(out_dir: Path, iteration: int, lr: float, problem: str) -> str:
    """What a diverged run says: the iteration, the problem, and the checkpoint a rerun would resume from."""
    newest = list_checkpoints(out_dir)
    resume = f"the newest checkpoint, {newest[-1][1]}, is untouched" if newest else "no checkpoint was written"
    return (f"training diverged at iteration {iteration} (lr {lr:.3g}): {problem}; the step was not taken and {resume}"
            "; lower --lr or raise --warmup-iters and train in a new --out-dir (a run folder keeps its schedule)")


def stopped_message(out_dir: Path) -> str:
    """What a stopped run (Ctrl-C, SIGTERM) says: the checkpoint really kept in the run folder and where a rerun
    of the same command starts, read from the folder after the stop."""
    newest = list_checkpoints(Path(out_dir))
    if not newest:
        return (f"[train] stopped before the first checkpoint: nothing was saved yet in {out_dir}; running the same "
                "command again starts from iteration 0")
    iteration, path = newest[-1]
    return (f"[train] stopped; the newest checkpoint, {path} (iteration {iteration}), is kept: run the same command "
            f"again to resume from iteration {iteration}")


def _train(cfg: TrainConfig, ctx: WorkerContext, evaluator: Evaluator | None,
           sample_stream: torch.utils.data.Dataset | None, collate: Callable | None) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    is_main = ctx.rank == 0
    config_dict = cfg.to_dict()
    if is_main:
        check_resume_config(out_dir, config_dict, SCHEDULE_FIELDS)
    torch.manual_seed(cfg.seed)
    model, origin = initial_model(cfg.variant, cfg.init)
    if cfg.frozen_backbone:
        model.backbone.requires_grad_(False)
    checkpoints = list_checkpoints(out_dir)
    start = 0
    state = None
    pending: list[dict[str, Any]] = []
    if checkpoints:
        start, path = checkpoints[-1]
        state = load_training_checkpoint(path)
        check_resume_state(cfg, path, state)
        model.load_state_dict(state["state_dict"])
        pending = list(state.get("log_window", []))
        origin = f"resumed from {path} (iteration {start})"
    model.to(ctx.device)
    optimizer = build_optimizer(model, cfg.optim, model.config.vit.depth, model.config.layer_decay_rate)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        del state
    forward: torch.nn.Module = TrainForward(model)
    if ctx.wrap is not None and ctx.world_size > 1:
        forward = ctx.wrap(forward)
    log = CsvLog(out_dir / "log.csv", LOG_FIELDS)
    eval_log = CsvLog(out_dir / "eval.csv", EVAL_FIELDS)
    if is_main:
        log.truncate_after(start)
        eval_log.truncate_after(start)
        print(f"[train] InterFormer-{cfg.variant}: {origin}; iterations {start} -> {cfg.last_iter} of {cfg.max_iters}",
              flush=True)
    summary: dict[str, Any] = {"start_iter": start, "end_iter": start, "origin": origin}
    if is_main and evaluator is not None and missed_evaluation(cfg, start, eval_log):
        summary["eval"] = evaluate(evaluator, model, start, eval_log)  # a kill during it lost its row
    if start >= cfg.last_iter:
        return summary

    if sample_stream is None:
        sample_stream = SampleStream(open_sources(cfg), cfg.augment, cfg.seed, ctx.rank, ctx.world_size)
        collate = _collate_images
    loader = DataLoader(sample_stream, batch_size=cfg.batch_size,
                        sampler=RangeSampler(start * cfg.batch_size, cfg.last_iter * cfg.batch_size),
                        num_workers=cfg.loader_workers, collate_fn=collate, worker_init_fn=close_inherited_locks,
                        persistent_workers=False, prefetch_factor=2 if cfg.loader_workers > 0 else None)
    bar = tqdm(total=cfg.last_iter - start, desc="train", disable=not (is_main and ctx.progress),
               dynamic_ncols=True)
    t_data = time.perf_counter()
    it = start
    for it, micro_batches in enumerate(loader, start=start):
        t_step = time.perf_counter()
        lr = set_lr(optimizer, it, cfg.max_iters, cfg.optim)
        seed_torch_for(cfg.seed, ctx.rank, it)
        micro_batches = [(None if x is None else x.to(ctx.device), y.to(ctx.device),
                          None if p is None else [t.to(ctx.device) for t in p]) for x, y, p in micro_batches]
        try:
            metrics = training_step(forward, model, optimizer, micro_batches, iteration_rng(cfg.seed, ctx.rank, it),
                                    cfg.clicks, cfg.loss, cfg.frozen_backbone, cfg.freeze_bn)
        except TrainingDiverged as e:
            raise TrainingDiverged(diverged_message(out_dir, it + 1, lr, str(e))) from None
        done = it + 1
        metrics.update(iter=done, lr=lr, sec_per_iter=time.perf_counter() - t_step, data_sec=t_step - t_data)
        pending.append(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
        final = done == cfg.max_iters  # not --stop-at: a stopped session must log and evaluate as a straight run
        if done % cfg.log_interval == 0 or final:
            row = {k: float(np.mean([m[k] for m in pending])) for k in pending[0] if k != "iter"}
            row["iter"] = done
            if is_main:
                log.append([row])
            summary["last"] = row
            pending = []
        if checkpoint_due(cfg, done):  # it carries the rows' pending window
            if is_main:
                save_training_checkpoint(model, optimizer, out_dir, done, config_dict, cfg.keep_checkpoints, pending)
                if has_rows(out_dir / "log.csv"):
                    plot_loss(out_dir / "log.csv", out_dir / "loss.png")
            if ctx.barrier is not None:
                ctx.barrier()
        if evaluator is not None and evaluation_due(cfg, done) and is_main:  # after its checkpoint
            summary["eval"] = evaluate(evaluator, model, done, eval_log)
        t_data = time.perf_counter()
    bar.close()
    summary["end_iter"] = it + 1
    return summary
