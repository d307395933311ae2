"""Resume after faults injected at known events (never on time): a kill during evaluation, a failure between a
checkpoint and the next log row, a SIGKILLed driver whose data-loader worker lives on, leftover temp files, and a
checkpoint that comes before the first log row."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from interformer.training.augment import AugmentConfig
from interformer.training.config import TrainConfig
from interformer.training.data import DataSpec
from interformer.training.optim import OptimConfig
from interformer.training.run_lock import RunFolderBusy, RunFolderLock, busy_message
from interformer.training.runlog import EVAL_FIELDS, LOG_FIELDS, CsvLog, list_checkpoints
from interformer.training.stream import SampleStream
from interformer.training.trainer import _collate_images, open_sources, run_worker

ROOT = Path(__file__).resolve().parents[1]


class Injected(RuntimeError):
    """The fault a test injects (stands for a kill at that point)."""


def config(shared_dir: Path, out_dir: Path, **kw) -> TrainConfig:
    davis = shared_dir / "data/DAVIS"
    base = dict(out_dir=str(out_dir), data=(DataSpec.parse(f"folder:{davis / 'img'},masks={davis / 'gt'}"),),
                variant="small", max_iters=6, batch_size=1, loader_workers=0, checkpoint_interval=2, log_interval=3,
                augment=AugmentConfig(crop_size=32), optim=OptimConfig(lr=1e-3, warmup_iters=2))
    base.update(kw)
    return TrainConfig(**base)


class FailingStream(Dataset):
    """The run's own sample stream, raising once sample number `fail_at` is drawn."""

    def __init__(self, cfg: TrainConfig, fail_at: int) -> None:
        self.stream = SampleStream(open_sources(cfg), cfg.augment, cfg.seed)
        self.fail_at = fail_at

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, n: int):
        if n == self.fail_at:
            raise Injected(f"fault at sample {n}")
        return self.stream[n]


def fake_evaluator(calls: list[int], fail: bool = False):
    def evaluate(model) -> dict:
        calls.append(1)
        if fail:
            raise Injected("fault during evaluation")
        return {"dataset": "held-out", "protocol": "ritm", "samples": 1, "noc85": 1.0}
    return evaluate


def test_a_resumed_log_row_averages_the_same_iterations(shared_dir, tmp_path):
    """Checkpoint every 2, log every 3: a failure at iteration 3 (after checkpoint 2, before row 3) and a rerun
    give the rows of the uninterrupted run; the first checkpoint, before any row, does not stop the run."""
    torch.set_num_threads(1)
    straight = config(shared_dir, tmp_path / "a")
    run_worker(straight)
    broken = config(shared_dir, tmp_path / "b")
    with pytest.raises(Injected):
        run_worker(broken, sample_stream=FailingStream(broken, fail_at=2), collate=_collate_images)
    assert [it for it, _ in list_checkpoints(tmp_path / "b")] == [2] and not (tmp_path / "b/log.csv").exists()
    run_worker(broken)
    rows_a = CsvLog(tmp_path / "a/log.csv", LOG_FIELDS).rows()
    rows_b = CsvLog(tmp_path / "b/log.csv", LOG_FIELDS).rows()
    assert [r["iter"] for r in rows_a] == [r["iter"] for r in rows_b] == ["3", "6"]
    assert [(r["loss"], r["extra_clicks"]) for r in rows_a] == [(r["loss"], r["extra_clicks"]) for r in rows_b]
    assert (tmp_path / "b/loss.png").is_file()


def test_a_kill_during_evaluation_is_made_good_on_resume(shared_dir, tmp_path):
    cfg = config(shared_dir, tmp_path, max_iters=4, eval_interval=2, log_interval=1, eval_data="grabcut")
    calls: list[int] = []
    with pytest.raises(Injected):
        run_worker(cfg, evaluator=fake_evaluator(calls, fail=True))
    assert [it for it, _ in list_checkpoints(tmp_path)] == [2] and not (tmp_path / "eval.csv").exists()
    run_worker(cfg, evaluator=fake_evaluator(calls))
    assert [r["iter"] for r in CsvLog(tmp_path / "eval.csv", EVAL_FIELDS).rows()] == ["2", "4"]
    # the final evaluation too: lost in the last iteration, done by the rerun that has nothing left to train
    (tmp_path / "eval.csv").unlink()
    CsvLog(tmp_path / "eval.csv", EVAL_FIELDS).append([{"iter": 2, "dataset": "held-out"}])
    again = run_worker(cfg, evaluator=fake_evaluator(calls))
    assert again["start_iter"] == again["end_iter"] == 4 and again["eval"]["iter"] == 4
    assert [r["iter"] for r in CsvLog(tmp_path / "eval.csv", EVAL_FIELDS).rows()] == ["2", "4"]
    run_worker(cfg, evaluator=fake_evaluator(calls))  # nothing missing: nothing evaluated
    assert len(calls) == 4


def test_temp_checkpoints_of_a_killed_writer_are_removed(shared_dir, tmp_path):
    (tmp_path / "checkpoints").mkdir(parents=True)
    stale = tmp_path / "checkpoints" / ".iter_0000002.pth.4242.deadbeef.tmp"
    stale.write_bytes(b"half a checkpoint")
    run_worker(config(shared_dir, tmp_path, max_iters=2))
    assert not stale.exists() and [it for it, _ in list_checkpoints(tmp_path)] == [2]


def test_busy_message_says_whether_the_holder_still_runs(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    assert "has exited" in busy_message(tmp_path, {"pid": dead.pid, "host": host, "since": "now"})
    assert "still running" in busy_message(tmp_path, {"pid": os.getpid(), "host": host, "since": "now"})


def test_a_killed_drivers_loader_worker_does_not_hold_the_run_folder(shared_dir, tmp_path):
    """SIGKILL the driver (not its data-loader worker) once it wrote a checkpoint: the folder is free at once."""
    davis = shared_dir / "data/DAVIS"
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "jobs/train.py"), "--local", "--out-dir", str(out),
           "--data", f"folder:{davis / 'img'},masks={davis / 'gt'}", "--max-iters", "400", "--batch-size", "1",
           "--crop-size", "32", "--checkpoint-interval", "2", "--log-interval", "1", "--loader-workers", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list_checkpoints(out), "no checkpoint in time"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
        with RunFolderLock(out):
            pass
    except RunFolderBusy as e:
        pytest.fail(f"the run folder stayed locked after its writer was killed: {e}")


@pytest.mark.parametrize("stop_at, log_interval, checkpoint_interval, eval_interval", [
    (2, 4, 2, 3), (3, 4, 1, 2), (1, 3, 1, 4), (4, 5, 2, 5), (5, 2, 5, 3)])
def test_stop_at_changes_neither_the_log_nor_the_evaluations(shared_dir, tmp_path, stop_at, log_interval,
                                                             checkpoint_interval, eval_interval):
    """A session stopped by --stop-at and a rerun write the log.csv rows and eval.csv iterations of the straight
    run: no row or evaluation is forced at the stop, and its checkpoint carries the iterations not yet logged."""
    torch.set_num_threads(1)
    kw = dict(max_iters=6, log_interval=log_interval, checkpoint_interval=checkpoint_interval,
              eval_interval=eval_interval, eval_data="grabcut", deterministic=True)
    run_worker(config(shared_dir, tmp_path / "a", **kw), evaluator=fake_evaluator([]))
    stopped = run_worker(config(shared_dir, tmp_path / "b", stop_at=stop_at, **kw), evaluator=fake_evaluator([]))
    assert stopped["end_iter"] == stop_at and stop_at in [it for it, _ in list_checkpoints(tmp_path / "b")]
    run_worker(config(shared_dir, tmp_path / "b", **kw), evaluator=fake_evaluator([]))
    fields = ("iter", "lr", "loss", "decode_loss", "aux_loss", "extra_clicks", "clicks_per_sample")
    rows_a = [[r[f] for f in fields] for r in CsvLog(tmp_path / "a/log.csv", LOG_FIELDS).rows()]
    rows_b = [[r[f] for f in fields] for r in CsvLog(tmp_path / "b/log.csv", LOG_FIELDS).rows()]
    assert rows_a == rows_b and rows_a[-1][0] == "6"
    evals = [[r["iter"] for r in CsvLog(tmp_path / run / "eval.csv", EVAL_FIELDS).rows()] for run in ("a", "b")]
    assert evals[0] == evals[1] == sorted({str(i) for i in range(eval_interval, 7, eval_interval)} | {"6"}, key=int)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_iters=st.integers(2, 6), checkpoint_interval=st.integers(1, 20), eval_interval=st.integers(1, 6),
       data=st.data())
def test_every_evaluation_has_its_checkpoint_written_before_it(shared_dir, tmp_path_factory, max_iters,
                                                               checkpoint_interval, eval_interval, data):
    """Whatever --checkpoint-interval (the default 20000 against --eval-interval 500 in the documented fine-tune),
    the checkpoint of an evaluated iteration is on disk when its evaluation starts: a stop after an evaluation
    keeps at least that checkpoint, and a kill during it is made good by the rerun (missed_evaluation)."""
    torch.set_num_threads(1)
    stop_at = data.draw(st.one_of(st.none(), st.integers(1, max_iters)))
    out = tmp_path_factory.mktemp("run")
    cfg = config(shared_dir, out, max_iters=max_iters, checkpoint_interval=checkpoint_interval,
                 eval_interval=eval_interval, eval_data="grabcut", log_interval=1, stop_at=stop_at)
    seen: list[list[int]] = []  # the checkpoints on disk as each evaluation starts

    def evaluator(model) -> dict:
        seen.append([it for it, _ in list_checkpoints(out)])
        return {"dataset": "held-out", "protocol": "ritm", "samples": 1, "noc85": 1.0}

    run_worker(cfg, evaluator=evaluator)
    evaluated = [int(r["iter"]) for r in CsvLog(out / "eval.csv", EVAL_FIELDS).rows()]
    assert len(evaluated) == len(seen)
    for it, on_disk in zip(evaluated, seen):
        assert it in on_disk, (it, on_disk)
