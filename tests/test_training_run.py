"""A training run folder has one writer; --deterministic runs are bit-identical; the held-out data root is one rule.

The writer lock is tested across processes (a second process holds it, or tries to take it while the
trainer writes), never by timing: each step waits for the other process to say what it did.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from interformer.training.config import TrainConfig
from interformer.training.run_lock import RunFolderBusy
from interformer.training.runlog import LOG_FIELDS, CsvLog, list_checkpoints
from interformer.training.trainer import run_worker
from pipeline.datasets import DatasetError, default_data_root
from test_training_resume import config as resume_config

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys; from interformer.training.run_lock import RunFolderLock; lock = RunFolderLock(sys.argv[1]); "
        "lock.acquire(); print('held', flush=True); sys.stdin.read()")
TRY = ("import os, sys; from interformer.training.run_lock import RunFolderBusy, RunFolderLock\n"
       "try:\n    RunFolderLock(sys.argv[1]).acquire()\n    print('acquired')\n"
       "except RunFolderBusy as e:\n    print('busy', e)\n")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def config(shared_dir: Path, out_dir: Path, **kw) -> TrainConfig:
    """The resume test's short run (small model, 64-pixel crops), 6 iterations with one checkpoint at the end."""
    return resume_config(shared_dir, out_dir, **{"max_iters": 6, "checkpoint_interval": 6, **kw})


def test_deterministic_runs_are_bit_identical_with_two_cpus_per_worker(shared_dir, tmp_path):
    before = torch.get_num_threads()
    inside = []

    def record(model) -> dict:  # called by the loop at every iteration: the settings the run trains with
        inside.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))
        return {}

    runs = [run_worker(config(shared_dir, tmp_path / name, cpus_per_worker=2, deterministic=True, eval_data="x",
                              eval_interval=1), evaluator=record) for name in "ab"]
    assert all(r["end_iter"] == 6 for r in runs) and set(inside) == {(1, True)} and len(inside) == 12
    assert torch.get_num_threads() == before and not torch.are_deterministic_algorithms_enabled()
    a, b = (torch.load(tmp_path / n / "checkpoints/iter_0000006.pth", weights_only=False) for n in "ab")
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    columns = ("lr", "loss", "decode_loss", "aux_loss", "extra_clicks")
    rows = [[tuple(r[c] for c in columns) for r in CsvLog(tmp_path / n / "log.csv", LOG_FIELDS).rows()] for n in "ab"]
    assert len(rows[0]) == 6 and rows[0] == rows[1]


@pytest.fixture
def holder(tmp_path):
    """Another process holding the writer lock of tmp_path/run until the test ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(shared_dir, tmp_path, holder):
    cfg = config(shared_dir, tmp_path / "run", max_iters=1, checkpoint_interval=1)
    with pytest.raises(RunFolderBusy, match=f"process {holder.pid} on "):
        run_worker(cfg)
    job = [sys.executable, "-m", "jobs.train", "--local", "--out-dir", str(tmp_path / "run"), "--data",
           str(cfg.data[0]), "--max-iters", "1", "--batch-size", "1", "--crop-size", "64", "--loader-workers", "0"]
    refused = subprocess.run(job, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert f"is being written by process {holder.pid}" in refused.stderr and "one writer at a time" in refused.stderr
    assert not (tmp_path / "run" / "log.csv").exists() and not list_checkpoints(tmp_path / "run")
    holder.stdin.close()  # the first writer ends: the folder is free again, no stale lock is left
    holder.wait(timeout=60)
    done = subprocess.run(job, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [it for it, _ in list_checkpoints(tmp_path / "run")] == [1]


def test_the_trainer_holds_the_lock_while_it_writes(shared_dir, tmp_path):
    seen = []

    def evaluator(model) -> dict:  # runs inside the training loop, between writes
        probe = subprocess.run([sys.executable, "-c", TRY, str(tmp_path / "run")], env=_env(), capture_output=True,
                               text=True, timeout=120)
        seen.append(probe.stdout)
        return {"dataset": "probe"}

    cfg = config(shared_dir, tmp_path / "run", max_iters=2, checkpoint_interval=1, eval_data="probe",
                 eval_interval=1)
    run_worker(cfg, evaluator=evaluator)
    assert len(seen) == 2 and all(s.startswith("busy") and f"process {os.getpid()}" in s for s in seen), seen
    after = subprocess.run([sys.executable, "-c", TRY, str(tmp_path / "run")], env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert after.stdout.startswith("acquired")


def test_benchmark_names_resolve_against_the_checkout_from_any_folder(shared_dir, tmp_path, monkeypatch):
    from jobs.evaluate import parse_args
    from pipeline.training_run import eval_refs, with_eval_data

    monkeypatch.chdir(tmp_path)
    assert default_data_root().resolve() == (shared_dir / "data").resolve()
    assert parse_args(["--baseline", "grabcut", "GrabCut"]).data_root == default_data_root()
    cfg = with_eval_data(config(shared_dir, tmp_path / "run", eval_data="grabcut").with_absolute_paths())
    assert cfg.eval_data_root == str(default_data_root()) and len(eval_refs(cfg)) == 50
    with pytest.raises(DatasetError, match="--eval-data-root"):
        with_eval_data(replace(cfg, eval_data_root=str(tmp_path / "nowhere")))


def test_train_evaluates_a_benchmark_from_another_folder(shared_dir, tmp_path):
    davis = shared_dir / "data/DAVIS"
    job = [sys.executable, str(ROOT / "jobs/train.py"), "--local", "--out-dir", "run", "--data",
           f"folder:{davis / 'img'},masks={davis / 'gt'}", "--max-iters", "1", "--batch-size", "1", "--crop-size",
           "64", "--loader-workers", "0", "--eval-data", "grabcut", "--eval-interval", "1", "--eval-max-samples",
           "1", "--eval-clicks", "2", "--eval-protocol", "ritm"]
    missing = subprocess.run(job + ["--eval-data-root", "nowhere"], cwd=tmp_path, env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    assert "benchmark grabcut not found" in missing.stderr and "--eval-data-root" in missing.stderr
    assert not list_checkpoints(tmp_path / "run")
    done = subprocess.run(job, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = CsvLog(tmp_path / "run" / "eval.csv", ("iter", "dataset", "samples")).rows()
    assert [(r["iter"], r["dataset"], r["samples"]) for r in rows] == [("1", "grabcut", "1")]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["eval_data_root"] == str(default_data_root())
