"""Two pre-annotation runs at once on one Label Studio project (the real server of the session fixture
`label_studio`), ordered by fault hold points, never by sleeps.

Run A holds at its first image (`INTERFORMER_FAULT=segment:hold`) after it has created the tasks and read
which of them hold a prediction of its model version (none). A second run on A's run folder is refused at
once with a clear message (the folder's writer lock). Run B, with a run folder of its own, holds at the same
point having read the same stale "nothing delivered yet". A is released and pushes; then B is released: it
re-reads its batch's tasks just before the import and pushes nothing. Each task ends with one prediction.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backend_support import LABEL_CONFIG
from preannotate_support import prepare_store

from pipeline.faults import FAULT_DIR_ENV, FAULT_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, label_studio):
    tmp = tmp_path_factory.mktemp("preannotate_concurrent")
    return {**prepare_store(tmp, n_grabcut=2, n_berkeley=1), "ls": label_studio, "client": label_studio.client()}


def _start(env, project: int, run_dir: str, faults: Path | None) -> subprocess.Popen:
    fx = env["fx"]
    args = [sys.executable, str(ROOT / "jobs" / "preannotate.py"), "--db", str(env["tmp"] / "db"),
            "--checkpoint", str(env["ckpt"]), "--workers", "0", "--max-clicks", "2",
            "--run-dir", str(env["tmp"] / run_dir), "--coco", str(fx.coco_path), "--image-root", str(fx.image_root),
            "--ls-project", str(project), "--push"]
    child = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, FAULT_DIR_ENV)}
    child.update(env["ls"].env(), PYTHONPATH=str(ROOT))
    if faults is not None:
        faults.mkdir()
        child.update({FAULT_ENV: "segment:hold", FAULT_DIR_ENV: str(faults)})
    return subprocess.Popen(args, env=child, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_held(proc: subprocess.Popen, faults: Path, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s  # a bound on a hang, not a speed requirement
    while not list(faults.glob("held-*")):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before holding (rc {proc.returncode}): {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "the run never reached its hold point"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout_s: float = 300.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out, err


def _summary(env, run_dir: str) -> dict:
    return json.loads((env["tmp"] / run_dir / "summary.json").read_text())


def test_two_runs_at_once_push_each_prediction_once_and_a_shared_run_folder_is_refused(env):
    client = env["client"]
    project = client.projects.create(title="two runs at once", label_config=LABEL_CONFIG).id
    fa, fb = env["tmp"] / "faults-a", env["tmp"] / "faults-b"
    a = _start(env, project, "run-a", fa)
    b = None
    try:
        _wait_held(a, fa)

        rc, out, err = _finish(_start(env, project, "run-a", None))
        assert rc != 0 and "Traceback" not in err
        assert "is in use by another pre-annotation run" in err and f"process {a.pid} " in err and "--run-dir" in err

        b = _start(env, project, "run-b", fb)
        _wait_held(b, fb)
        (fa / "release").touch()
        rc, out, err = _finish(a)
        assert rc == 0, err[-3000:]
        first = _summary(env, "run-a")
        assert first["tasks_created"] > 0 and first["pushed"] > 0

        (fb / "release").touch()
        rc, out, err = _finish(b)
        assert rc == 0, err[-3000:]
        second = _summary(env, "run-b")
        assert second["tasks_created"] == 0 and second["delivered_before"] == 0  # it read the project before A pushed
        assert second["pushed"] == 0 and second["pushed_by_another_run"] == first["pushed"]
        assert "another run had pushed them meanwhile" in out
    finally:
        for proc, faults in ((a, fa), (b, fb)):
            if proc is not None and proc.poll() is None:
                (faults / "release").touch()
                proc.kill()
                proc.wait()

    per_task: dict[int, list[str]] = {}
    for p in client.predictions.list(project=project):
        per_task.setdefault(p.task, []).append(p.model_version)
    assert sum(len(v) for v in per_task.values()) == first["pushed"]
    assert all(len(v) == 1 for v in per_task.values()), per_task


def test_a_run_folder_in_use_is_refused_before_anything_is_read_or_written(tmp_path):
    """The lock alone, without Label Studio: a second lock on a held folder raises RunDirError naming the
    holder, and the lock is free again once released."""
    from pipeline.preannotation_run import RunDirError, lock_run_dir

    held = lock_run_dir(tmp_path)
    try:
        with pytest.raises(RunDirError, match=rf"in use by another pre-annotation run \(process {os.getpid()} "):
            lock_run_dir(tmp_path)
    finally:
        held.release()
    lock_run_dir(tmp_path).release()
