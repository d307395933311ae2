"""Serve InterFormer masks to Label Studio: the ML backend (`interformer-backend`, the same as `python -m connectors`)."""
from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__ and _ROOT not in sys.path:  # run as a file: its folder, not the checkout's root, is on sys.path
    sys.path.insert(0, _ROOT)  # so the guard below, not an import traceback, answers a python without the packages

from pipeline.ray_runtime import prepare_job_process  # noqa: E402

prepare_job_process("jobs/backend.py")  # before the imports that need the project's packages

from connectors.cli import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
