"""Two pre-annotation runs at once on one Label Studio project (the real server of the session fixture
`label_studio`), ordered by fault hold points or by proxies that hold requests (tests/ls_proxy.py), never by
sleeps.

Run A holds at its first image (`INTERFORMER_FAULT=segment:hold`) after it has created the tasks and read
which of them hold a prediction of its model version (none). A second run on A's run folder is refused at
once with a clear message (the folder's writer lock). Run B, with a run folder of its own, holds at the same
point having read the same stale "nothing delivered yet". A is released and pushes; then B is released: it
re-reads its batch's tasks just before the import and pushes nothing. Each task ends with one prediction.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from backend_support import LABEL_CONFIG
from ls_proxy import LabelStudioProxy
from preannotate_support import prepare_store

from pipeline.faults import FAULT_DIR_ENV, FAULT_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, label_studio):
    tmp = tmp_path_factory.mktemp("preannotate_concurrent")
    return {**prepare_store(tmp, n_grabcut=2, n_berkeley=1), "ls": label_studio, "client": label_studio.client()}


def _start(env, project: int, run_dir: str, faults: Path | None, ls_url: str | None = None) -> subprocess.Popen:
    fx = env["fx"]
    args = [sys.executable, str(ROOT / "jobs" / "preannotate.py"), "--db", str(env["tmp"] / "db"),
            "--checkpoint", str(env["ckpt"]), "--workers", "0", "--max-clicks", "2",
            "--run-dir", str(env["tmp"] / run_dir), "--coco", str(fx.coco_path), "--image-root", str(fx.image_root),
            "--ls-project", str(project), "--push"]
    child = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, FAULT_DIR_ENV)}
    child.update(env["ls"].env(), PYTHONPATH=str(ROOT))
    if ls_url is not None:
        child["LABEL_STUDIO_URL"] = ls_url
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


TASK_IMPORT = re.compile(r"/api/projects/\d+/import(\?|$)")


class ImportOrder:
    """Orders the task imports of runs "a" and "b", each reaching Label Studio through its own proxy.

    Both imports are held until both have arrived (so each run has read the project twice and found the
    images without a task); then `first`'s goes through. With `reread_first`, the second import waits until
    `first` has read the tasks again after its import (it then sees only its own tasks); otherwise the
    second import lands before `first` reads them again (both runs then see both sets of tasks)."""

    def __init__(self, upstream: str, first: str, reread_first: bool) -> None:
        self.first, self.second = first, "b" if first == "a" else "a"
        self.reread_first = reread_first
        self.arrived: set[str] = set()
        self.lock = threading.Lock()
        self.proxies = {run: LabelStudioProxy(upstream, before=lambda m, p, run=run: self._before(run, m, p))
                        for run in ("a", "b")}

    def _imported(self, run: str) -> bool:
        return any(TASK_IMPORT.search(path) for _, path, _ in self.proxies[run].posts("/import"))

    def _reread_after_import(self, run: str) -> bool:
        log = self.proxies[run].log
        at = next((n for n, (m, path, _) in enumerate(log) if m == "POST" and TASK_IMPORT.search(path)), None)
        return at is not None and any(m == "GET" and path.startswith("/api/tasks") for m, path, _ in log[at:])

    @staticmethod
    def _wait(ready, timeout_s: float = 300.0) -> None:
        """Poll `ready` (what another request thread logs) until true; the bound is on a hang only."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert time.monotonic() < deadline, "the other run never got there"
            time.sleep(0.05)

    def _before(self, run: str, method: str, path: str) -> None:
        if method == "POST" and TASK_IMPORT.search(path):
            with self.lock:
                self.arrived.add(run)
            self._wait(lambda: len(self.arrived) == 2)
            if run == self.second:
                self._wait(lambda: self._reread_after_import(self.first) if self.reread_first
                           else self._imported(self.first))
        elif (method == "GET" and path.startswith("/api/tasks") and run == self.first and not self.reread_first
              and self._imported(self.first)):
            self._wait(lambda: self._imported(self.second))

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()


@pytest.mark.parametrize("first, reread_first", [("a", True), ("b", False)])
def test_two_runs_creating_tasks_at_once_leave_one_task_per_image_with_one_prediction(env, first, reread_first):
    """Two runs on an EMPTY project both find every image without a task and both create one. After creating,
    each deletes the tasks it made wherever a lower-id task shows the same image: whichever order the
    imports and the re-reads come in, every image ends with one task holding one prediction."""
    client = env["client"]
    project = client.projects.create(title=f"two runs create tasks {first}", label_config=LABEL_CONFIG).id
    order = ImportOrder(env["ls"].url, first, reread_first)
    tag = f"{first}-{int(reread_first)}"
    try:
        runs = {r: _start(env, project, f"create-{tag}-{r}", None, order.proxies[r].url) for r in ("a", "b")}
        results = {r: _finish(p) for r, p in runs.items()}
    finally:
        order.close()
    summaries = {r: _summary(env, f"create-{tag}-{r}") for r in ("a", "b")}
    for r, (rc, out, err) in results.items():  # a run finding the other's masks already there segments nothing
        done_by_other = (rc == 1 and summaries[r]["segmented"] == 0 and summaries[r]["delivered_before"] > 0
                         and "no object could be segmented" in err)
        assert (rc == 0 or done_by_other) and "Traceback" not in err, err[-3000:]
    second = order.second
    assert all(order._imported(r) for r in ("a", "b"))  # both runs created tasks

    tasks = list(client.tasks.list(project=project))
    images = [t.data["image_id"] for t in tasks]
    assert sorted(images) == sorted(set(images)), images  # one task per image
    per_task: dict[int, list[str]] = {}
    for p in client.predictions.list(project=project):
        per_task.setdefault(p.task, []).append(p.model_version)
    assert set(per_task) <= {t.id for t in tasks} and all(len(v) == 1 for v in per_task.values()), per_task
    masked = {t.id for t in tasks if t.data["image_id"] not in (env["fx"].unencoded, env["fx"].missing_file)}
    assert set(per_task) == masked and masked

    assert len(images) == summaries[first]["tasks_created"] and summaries[first]["duplicate_tasks_removed"] == 0
    assert summaries[second]["duplicate_tasks_removed"] == len(images) and summaries[second]["tasks_created"] == 0
    assert "tasks this run created were deleted again" in results[second][1]
    assert summaries[second]["duplicate_tasks"] == []  # the first may have seen the second's before they went


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
