"""jobs/evaluate.py as a user meets it: a bad option is one `error:` line and exit 2 before any worker starts
(no Ray, no model), an output folder that cannot be made is the same, and a run stopped by SIGTERM (or Ctrl-C)
ends with one line saying what was kept, exit 130, and resumes on the next run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "evaluate.py"
DATA = ["--data-root", str(ROOT.parent / "shared" / "data")]


@pytest.mark.parametrize("bad, named", [
    (["--random-init", "foo"], "--random-init"),
    (["--random-init", "small", "--device", "bogus"], "--device"),
    (["--random-init", "small", "--device", "cuda:0"], "--device"),
    (["--random-init", "small", "--feature-table", "../x"], "--feature-table"),
])
def test_bad_options_are_refused_before_any_worker_starts(tmp_path, bad, named):
    if "cuda:0" in bad:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(JOB), *bad, "GrabCut", *DATA, "--output", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and named in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists() and time.monotonic() - t0 < 60


def test_an_output_folder_that_cannot_be_made_is_one_error_line(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    done = subprocess.run([sys.executable, str(JOB), "--baseline", "grabcut", "GrabCut", *DATA, "--limit", "1",
                           "--output", str(blocker / "out"), "--workers", "1", "--num-cpus", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr


def test_a_stopped_run_says_what_it_kept_exits_130_and_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(JOB), "--baseline", "grabcut", "GrabCut", *DATA, "--limit", "6", "--output", str(out),
           "--workers", "1", "--num-cpus", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 300
    while not (results.exists() and results.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no result within 300 s"
        time.sleep(0.2)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be stopped")
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped" in err and "Traceback" not in err, err[-2000:]
    kept = len(results.read_text().splitlines())
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    ids = [json.loads(line)["sample_id"] for line in results.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6 and kept >= 1


@pytest.mark.parametrize("nodes, gpus, cpus, refused", [
    ([{"CPU": 2.0}], 1.0, 1.0, "--gpus-per-worker"),
    ([{"CPU": 2.0, "GPU": 1.0}], 1.0, 1.0, None),
    ([{"CPU": 2.0, "GPU": 0.5}, {"CPU": 8.0}], 1.0, 1.0, "--gpus-per-worker"),
    ([{"CPU": 2.0}, {"CPU": 4.0}], 0.0, 4.0, None),
    ([{"CPU": 2.0}, {"CPU": 4.0}], 0.0, 6.0, "--cpus-per-worker"),
    ([], 0.0, 1.0, "--cpus-per-worker"),
])
def test_worker_options_no_node_can_take_are_named(nodes, gpus, cpus, refused):
    from pipeline.evaluation_run import WorkerPlacement, placement_problem

    problem = placement_problem(WorkerPlacement(cpus_per_worker=cpus, gpus_per_worker=gpus), nodes)
    assert (problem is None) if refused is None else problem.startswith(refused)


def test_gpus_a_cpu_cluster_lacks_are_refused_instead_of_waiting_forever(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, str(JOB), "--baseline", "grabcut", "GrabCut", *DATA, "--limit", "1",
                           "--output", str(tmp_path / "o"), "--gpus-per-worker", "1", "--num-cpus", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--gpus-per-worker" in done.stderr and "Traceback" not in done.stderr
