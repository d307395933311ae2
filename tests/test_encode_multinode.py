"""The encode job on a multi-node Ray cluster on this machine, with a worker node killed mid-run.

The kill is triggered by an event, not by time: the write stage holds (pipeline.faults "hold") once it has
written its first fragment and before staging it; the test kills the node that runs that write task, then
lets the run go on. The job must finish on its own (exit 0), with every good image stored exactly once
(rows counted with lancedb) and every bad input recorded with its reason.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lancedb
import numpy as np
import pytest
from multinode_support import FAST_NODE_DEATH, LOOPBACK_DRIVER, node_of_process, start_cluster, wait_for
from PIL import Image

from pipeline.faults import FAULT_DIR_ENV, FAULT_ENV

ROOT = Path(__file__).resolve().parents[1]
BAD = {"broken.jpg": "corrupt", "empty.png": "empty", "dangling.png": "unreadable", "folder.jpg": "unreadable"}


def _collection(root: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    good = []
    for k in range(n):
        rel = f"part{k % 2}/im{k:02d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (96 + 32 * (k % 2), 128, 3), dtype=np.uint8)).save(root / rel)
        good.append(rel)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    (root / "empty.png").write_bytes(b"")
    (root / "dangling.png").symlink_to(root / "no-such-file.png")
    (root / "folder.jpg").mkdir()
    return sorted(good)


def _rows(db: Path) -> list[str]:
    table = lancedb.connect(str(db)).open_table("features").to_arrow()
    return sorted(table.column("image_id").to_pylist())


def _errors(db: Path) -> dict[str, str]:
    table = lancedb.connect(str(db)).open_table("features_errors").to_arrow()
    return dict(zip(table.column("image_id").to_pylist(), table.column("reason").to_pylist()))


@pytest.mark.slow
def test_encode_survives_a_worker_node_killed_mid_run(tmp_path):
    root = tmp_path / "images"
    good = _collection(root, 12)
    faults = tmp_path / "faults"
    faults.mkdir()
    cluster = start_cluster(workers=3, env={FAULT_ENV: "written:hold", FAULT_DIR_ENV: str(faults),
                                            "PYTHONPATH": str(ROOT)})
    db = tmp_path / "db"
    try:
        cmd = [sys.executable, "-m", "jobs.encode", str(root), "--db", str(db), "--variant", "small",
               "--address", cluster.address,  # no pool options: the default plan must fit nodes of 1 CPU
               "--batch-size", "2", "--write-batch", "2", "--commit-interval", "0.2"]
        env = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, "RAY_ADDRESS")}
        env.update(PYTHONPATH=str(ROOT), **LOOPBACK_DRIVER)
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            held = wait_for(lambda: sorted(faults.glob("held-*")) or job.poll() is not None,
                            "a write task to hold after its first fragment", timeout=600)
        except AssertionError:
            job.kill()
            raise
        assert held is not True, "the job ended before any write task held:\n" + job.communicate()[0][-4000:]
        pid = int(held[0].name.split("-")[1])
        node = node_of_process(cluster, pid)
        assert node is not None, f"write task {pid} runs on no worker node"
        cluster.remove_node(node, allow_graceful=False)  # the node dies with the task, its fragment unstaged
        (faults / "release").touch()
        out, _ = job.communicate(timeout=900)
    finally:
        (faults / "release").touch()
        cluster.shutdown()
    assert job.returncode == 0, out[-4000:]
    assert "1 CPU encoder actor(s), 1 CPUs each" in out, out[-3000:]  # was 2 CPUs (from the total): a hang
    assert _rows(db) == good, "each good image stored exactly once"
    assert _errors(db) == BAD
    assert f"encoded      {len(good)} of {len(good) + len(BAD)} to do" in out, out[-3000:]
    assert not list((tmp_path / "db" / "features_staged").glob("*.json")), "staged work left uncommitted"


@pytest.mark.slow
def test_encoders_no_node_can_hold_are_refused_before_anything_is_written(tmp_path):
    """Ray places an actor whole on one node and waits forever for one no live node can hold: encoders of 2 CPUs
    on nodes of 1 CPU (3 CPUs in all) are exit 2 with one sentence, and no row is written."""
    root = tmp_path / "images"
    _collection(root, 2)
    cluster = start_cluster(workers=3)
    db = tmp_path / "db"
    try:
        cmd = [sys.executable, "-m", "jobs.encode", str(root), "--db", str(db), "--variant", "small",
               "--address", cluster.address, "--num-encoders", "1", "--cpus-per-encoder", "2"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(PYTHONPATH=str(ROOT), **LOOPBACK_DRIVER)
        job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    finally:
        cluster.shutdown()
    errors = [line for line in job.stderr.splitlines() if line.startswith("error:")]
    assert job.returncode == 2 and len(errors) == 1 and "cannot all be placed" in errors[0], job.stderr[-3000:]
    assert "CPUs per node:" in errors[0], errors  # the sentence says why: the nodes' sizes
    tables = lancedb.connect(str(db)).table_names() if db.exists() else []
    assert "features" not in tables or not _rows(db), "nothing is written before the plan is checked"


@pytest.mark.slow
def test_encode_stops_with_one_error_when_every_worker_node_is_lost(tmp_path):
    """Every worker node killed once some rows are committed: Ray Data waits without end for an encoder no live
    node can hold. With --stall-timeout the job says it is waiting, then commits what was written and exits 1
    (not 130: nobody stopped it) with one error line; the committed rows stay, each once, nothing staged is left
    behind, so a rerun resumes from there (as after any stop). Kept cheap: one node, six small images; the GCS
    health check is shortened so that the dead node is known in seconds, not ~15 s."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(1)
    for k in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(root / f"im{k}.png")
    faults = tmp_path / "faults"
    faults.mkdir()
    # the 2nd written batch holds (before staging), so exactly the 1st is committed when the node dies
    cluster = start_cluster(workers=1, env={FAULT_ENV: "written:hold:2", FAULT_DIR_ENV: str(faults),
                                            "PYTHONPATH": str(ROOT), **FAST_NODE_DEATH})
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "jobs.encode", str(root), "--db", str(db), "--variant", "small",
           "--address", cluster.address, "--batch-size", "2", "--write-batch", "2", "--commit-interval", "0.2",
           "--stall-timeout", "3"]
    env = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, "RAY_ADDRESS")}
    env.update(PYTHONPATH=str(ROOT), **LOOPBACK_DRIVER)
    try:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: (sorted(faults.glob("held-*")) and _committed(db)) or job.poll() is not None,
                     "a write task to hold with the first batch committed", timeout=600)
            assert job.poll() is None, "the job ended before a write task held:\n" + job.communicate()[1][-4000:]
            committed = _committed(db)
            for node in list(cluster.worker_nodes):
                cluster.remove_node(node, allow_graceful=False)
            held = [int(p.name.split("-")[1]) for p in faults.glob("held-*")]
            wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in held), "the held tasks to die")
            out, err = job.communicate(timeout=180)  # before: no exit at all (the audit waited 240 s)
        finally:
            if job.poll() is None:
                job.kill()
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert job.returncode == 1, err[-4000:]
        assert len(errors) == 1 and "the cluster stalled" in errors[0] and "no live node" in errors[0], errors
        assert "run again" in errors[0], errors
        assert "encode: waiting: no image for" in err, err[-3000:]
    finally:
        (faults / "release").touch()
        cluster.shutdown()
    assert _rows(db) == committed, "the committed rows stay, each once, and nothing else"
    assert f"encoded      {len(committed)} of 6 to do" in out, out[-3000:]
    assert not list((db / "features_staged").glob("*.json")), "staged work left uncommitted"


def _committed(db: Path) -> list[str]:
    """The image ids committed so far ([] before the table exists)."""
    return _rows(db) if (db / "features.lance").is_dir() else []
