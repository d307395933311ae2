"""Checkpoint / resume: a run stopped (or killed) and restarted ends where the uninterrupted run ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from interformer.checkpoint import load_model
from interformer.training.augment import AugmentConfig
from interformer.training.config import TrainConfig
from interformer.training.data import DataSpec
from interformer.training.optim import OptimConfig
from interformer.training.runlog import CsvLog, LOG_FIELDS, list_checkpoints
from interformer.training.trainer import run_worker

ROOT = Path(__file__).resolve().parents[1]


def config(shared_dir: Path, out_dir: Path, **kw) -> TrainConfig:
    davis = shared_dir / "data/DAVIS"
    base = dict(out_dir=str(out_dir), data=(DataSpec.parse(f"folder:{davis / 'img'},masks={davis / 'gt'}"),),
                variant="small", max_iters=4, batch_size=2, loader_workers=0, checkpoint_interval=2, log_interval=1,
                augment=AugmentConfig(crop_size=64), optim=OptimConfig(lr=1e-3, warmup_iters=2))
    base.update(kw)
    return TrainConfig(**base)


def test_stopped_and_resumed_run_matches_the_uninterrupted_one(shared_dir, tmp_path):
    torch.set_num_threads(1)
    straight = run_worker(config(shared_dir, tmp_path / "a"))
    assert (straight["start_iter"], straight["end_iter"]) == (0, 4)
    first = run_worker(config(shared_dir, tmp_path / "b", stop_at=2))
    assert first["end_iter"] == 2
    second = run_worker(config(shared_dir, tmp_path / "b"))
    assert second["start_iter"] == 2 and second["end_iter"] == 4 and "resumed" in second["origin"]
    a = torch.load(tmp_path / "a/checkpoints/iter_0000004.pth", weights_only=False)
    b = torch.load(tmp_path / "b/checkpoints/iter_0000004.pth", weights_only=False)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    rows_a = CsvLog(tmp_path / "a/log.csv", LOG_FIELDS).rows()
    rows_b = CsvLog(tmp_path / "b/log.csv", LOG_FIELDS).rows()
    assert [r["iter"] for r in rows_b] == ["1", "2", "3", "4"]
    for ra, rb in zip(rows_a, rows_b):
        assert (ra["lr"], ra["loss"], ra["extra_clicks"]) == (rb["lr"], rb["loss"], rb["extra_clicks"])
    # the checkpoint is an ordinary model file, and a finished run does nothing when started again
    assert load_model(tmp_path / "b/checkpoints/iter_0000004.pth").config.name == "small"
    assert a["meta"]["iter"] == 4 and "optimizer" in a
    assert (tmp_path / "a/loss.png").stat().st_size > 10_000  # the loss curve is redrawn at checkpoints
    again = run_worker(config(shared_dir, tmp_path / "b"))
    assert again["start_iter"] == again["end_iter"] == 4


def test_changed_schedule_is_refused(shared_dir, tmp_path):
    run_worker(config(shared_dir, tmp_path, max_iters=2, checkpoint_interval=1))
    with pytest.raises(ValueError, match="max_iters"):
        run_worker(config(shared_dir, tmp_path, max_iters=8))
    base = config(shared_dir, tmp_path, max_iters=2, checkpoint_interval=1)
    with pytest.raises(ValueError, match="optim"):
        run_worker(replace(base, optim=replace(base.optim, lr=base.optim.lr * 2)))


def test_killed_job_resumes_from_its_last_checkpoint(shared_dir, tmp_path):
    davis = shared_dir / "data/DAVIS"
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "jobs/train.py"), "--local", "--out-dir", str(out),
           "--data", f"folder:{davis / 'img'},masks={davis / 'gt'}", "--max-iters", "40", "--batch-size", "1",
           "--crop-size", "64", "--checkpoint-interval", "2", "--log-interval", "1", "--loader-workers", "0",
           "--warmup-iters", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert list_checkpoints(out), proc.communicate()[0] if proc.poll() is not None else "no checkpoint in time"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = list_checkpoints(out)[-1][0]
    assert killed_at < 40
    rerun = subprocess.run(cmd + ["--stop-at", str(killed_at + 2)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"(iteration {killed_at})" in rerun.stdout
    iters = [int(r["iter"]) for r in CsvLog(out / "log.csv", LOG_FIELDS).rows()]
    assert iters == list(range(1, killed_at + 3))


@pytest.mark.slow
def test_ray_train_job(shared_dir, tmp_path):
    """jobs/train.py on a private local Ray (TorchTrainer, one CPU worker) writes checkpoints and logs."""
    davis = shared_dir / "data/DAVIS"
    out = tmp_path / "ray_run"
    cmd = [sys.executable, str(ROOT / "jobs/train.py"), "--out-dir", str(out),
           "--data", f"folder:{davis / 'img'},masks={davis / 'gt'}", "--max-iters", "2", "--batch-size", "2",
           "--crop-size", "64", "--checkpoint-interval", "2", "--log-interval", "1", "--loader-workers", "0"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert [it for it, _ in list_checkpoints(out)] == [2]
    assert [r["iter"] for r in CsvLog(out / "log.csv", LOG_FIELDS).rows()] == ["1", "2"]
    assert load_model(out / "checkpoints/iter_0000002.pth").config.name == "small"
