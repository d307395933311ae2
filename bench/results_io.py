"""Raw benchmark output with what it was measured on: one JSON file per run under bench/results/.

Every figure the docs quote names the file it comes from. A file holds the script and its arguments, the
figures, and the machine: `lscpu`'s model name and flags, CPU count, the load average when the run started
and when it ended (other people's work changes timings several-fold on a shared machine), the versions of
the libraries that do the work, the git commit, the torch thread count and OpenMP settings.

    started = begin()                      # at the start of a run: load average, time
    ...
    save("bench_model", figures, started)  # -> bench/results/bench_model-20260101T120000Z.json
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "numpy", "pyarrow", "pylance", "lancedb", "ray", "opencv-python-headless", "label-studio-sdk",
            "fastapi", "uvicorn", "pycocotools", "openvino")


def _lscpu() -> dict[str, Any]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return {"model_name": fields.get("Model name"), "flags": fields.get("Flags", "").split(),
            "cpus": fields.get("CPU(s)"), "hypervisor": fields.get("Hypervisor vendor"),
            "l2_cache": fields.get("L2 cache"), "l3_cache": fields.get("L3 cache")}


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=RESULTS.parent, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=RESULTS.parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() + ("+uncommitted" if dirty else "")) or None


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def begin() -> dict[str, Any]:
    """What to take before measuring: the time and the load average at the start."""
    return {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average_start": load_average(),
            "t0": time.monotonic()}


def machine() -> dict[str, Any]:
    """The machine and software a figure was measured on."""
    info: dict[str, Any] = {"lscpu": _lscpu(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "versions": _versions(), "git_commit": _git_commit(),
                            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                                   "MKL_NUM_THREADS")}}
    if "torch" in sys.modules:  # only when the benchmark uses it: importing torch here would skew a cold start
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def save(name: str, figures: dict[str, Any], started: dict[str, Any], out: str | os.PathLike | None = None) -> Path:
    """Write the run's figures with its machine record; returns the path (default bench/results/NAME-UTC.json)."""
    record = {
        "script": name,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "started_utc": started["started_utc"],
        "seconds": round(time.monotonic() - started["t0"], 1),
        "load_average_start": started["load_average_start"],
        "load_average_end": load_average(),
        "machine": machine(),
        "figures": figures,
    }
    path = Path(out) if out else RESULTS / f"{name}-{started['started_utc'].replace('-', '').replace(':', '')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"raw results: {path} (load average {record['load_average_start'][0]} at start, "
          f"{record['load_average_end'][0]} at end)")
    return path
