"""Bulk pre-annotation (`python jobs/preannotate.py ... --address <cluster>`) on a multi-node Ray cluster on this
machine, with the node of a busy worker killed mid-run.

The kill is triggered by events: a worker holds (pipeline.faults "hold") as it starts its third image, after
the ledger holds a finished one; the test kills that worker's node, with its image in flight, then lets the
run go on. The job must finish (exit 0) with every object answered exactly once: one ledger record per image,
one COCO annotation per good object, none lost, none doubled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from backend_support import encode_into_store, make_checkpoint
from multinode_support import FAST_NODE_DEATH, LOOPBACK_DRIVER, node_of_process, start_cluster, wait_for
from preannotate_support import build_prompt_file

from pipeline.faults import FAULT_DIR_ENV, FAULT_ENV
from pipeline.prompts import coco_prompts, read_coco_file

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "preannotate.py"


def _ledger_keys(run_dir: Path) -> list[str]:
    path = run_dir / "ledger.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["result"]["key"] for line in path.read_text().splitlines() if line.endswith("}")]


def _start(tmp_path: Path, workers: int, fault: str, *options: str, **cluster_env: str):
    """The prompt file, its features, a cluster of `workers` one-CPU nodes whose workers hold at `fault`, and the
    job started on it with `options`: (prompts, run folder, faults folder, cluster, job)."""
    fx = build_prompt_file(tmp_path)
    ckpt = make_checkpoint(tmp_path / "small.pth")
    encode_into_store(ckpt, tmp_path / "db", "features", [(i, str(fx.image_root / i), img) for i, img in fx.images.items()])
    faults = tmp_path / "faults"
    faults.mkdir()
    run_dir = tmp_path / "run"
    cluster = start_cluster(workers=workers, env={FAULT_ENV: fault, FAULT_DIR_ENV: str(faults),
                                                  "PYTHONPATH": str(ROOT), **cluster_env})
    cmd = [sys.executable, str(JOB), "--coco", str(fx.coco_path), "--image-root", str(fx.image_root),
           "--db", str(tmp_path / "db"), "--checkpoint", str(ckpt), "--run-dir", str(run_dir),
           "--max-clicks", "3", "--coco-out", str(tmp_path / "masks.json"), "--address", cluster.address, *options]
    env = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, "RAY_ADDRESS")}
    env.update(PYTHONPATH=str(ROOT), **LOOPBACK_DRIVER)
    try:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except BaseException:
        cluster.shutdown()
        raise
    return fx, run_dir, faults, cluster, job


def _held_worker(run_dir: Path, faults: Path) -> int:
    """Once an image is in the ledger and a worker holds its next one: that worker's pid."""
    held = wait_for(lambda: _ledger_keys(run_dir) and sorted(faults.glob("held-*")),
                    "a finished image in the ledger and a worker holding its next image")
    return int(held[0].name.split("-")[1])


@pytest.mark.slow
def test_preannotation_survives_a_worker_node_killed_mid_run(tmp_path):
    fx, run_dir, faults, cluster, job = _start(tmp_path, 3, "segment:hold:3", "--workers", "3")
    try:
        node = node_of_process(cluster, _held_worker(run_dir, faults))
        assert node is not None, "the held worker runs on no worker node"
        cluster.remove_node(node, allow_graceful=False)  # the worker dies with its image in flight
        (faults / "release").touch()
        stdout, _ = job.communicate(timeout=900)
    finally:
        (faults / "release").touch()
        if job.poll() is None:  # a failed wait: the job is stopped by the pid it has, not left behind
            job.kill()
        cluster.shutdown()
    assert job.returncode == 0, stdout[-4000:]
    keys = _ledger_keys(run_dir)
    jobs = {j.key for j in coco_prompts(read_coco_file(str(fx.coco_path)), str(fx.image_root)).images}
    assert sorted(keys) == sorted(jobs), "each image answered exactly once (one ledger record)"
    coco = json.loads((tmp_path / "masks.json").read_text())
    sources = Counter(int(a["source_key"].split(":")[1]) for a in coco["annotations"])
    assert sorted(sources.elements()) == sorted(fx.kinds), "each good object annotated exactly once"


@pytest.mark.slow
def test_preannotation_losing_every_worker_node_stops_with_one_error_not_as_a_stop(tmp_path):
    """A run whose only worker node dies used to wait 10 minutes and then end as if stopped by the user (exit
    130). With --stall-timeout it ends after that many seconds: exit 1, one error line saying the cluster stalled,
    and the images finished before are in the ledger exactly once, for a rerun to resume."""
    _, run_dir, faults, cluster, job = _start(tmp_path, 1, "segment:hold:2", "--stall-timeout", "3",
                                              **FAST_NODE_DEATH)
    try:
        pid = _held_worker(run_dir, faults)
        finished = _ledger_keys(run_dir)
        node = node_of_process(cluster, pid)
        assert node is not None, "the held worker runs on no worker node"
        cluster.remove_node(node, allow_graceful=False)
        # Actor calls go from the driver to the worker directly, not through the raylet: a worker released
        # before it has died with its node would finish the run
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the held worker to die with its node")
        (faults / "release").touch()
        stdout, _ = job.communicate(timeout=300)
    finally:
        (faults / "release").touch()
        if job.poll() is None:  # a failed wait: the job is stopped by the pid it has, not left behind
            job.kill()
        cluster.shutdown()
    assert job.returncode == 1, stdout[-4000:]
    errors = [line for line in stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the cluster stalled" in errors[0], stdout[-4000:]
    assert _ledger_keys(run_dir) == finished, "the finished images are kept, each once"
    assert not (tmp_path / "masks.json").exists(), "no COCO file from a run that did not finish"
