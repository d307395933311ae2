"""Joining Ray keeps the job's SIGTERM handler. Ray installs its own on `ray.init`, which ends the driver at once
(exit -15, or -6 from its failure handler) before the job commits, cleans up or says what it kept: every job
that stops on SIGTERM as on Ctrl-C (encode, pre-annotation, evaluation, training) relies on `init_ray` keeping
the handler set before it, whenever it is called (pre-annotation joins Ray lazily, mid-run)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, signal, sys, time
import ray
from pipeline.ray_runtime import init_ray

seen = []
signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
init_ray(None, num_cpus=1, job="test")
os.kill(os.getpid(), signal.SIGTERM)
deadline = time.monotonic() + 10
while not seen and time.monotonic() < deadline:
    time.sleep(0.05)
print("handled" if seen else "not handled", flush=True)
ray.shutdown()
"""


def test_the_callers_sigterm_handler_survives_joining_ray():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "handled", (done.returncode, done.stderr[-2000:])
