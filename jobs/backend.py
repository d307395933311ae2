"""Serve InterFormer masks to Label Studio: the ML backend (`interformer-backend`, the same as `python -m connectors`)."""
from __future__ import annotations

import sys

from pipeline.ray_runtime import prepare_job_process

prepare_job_process("jobs/backend.py")  # before the imports that need the project's packages

from connectors.cli import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
