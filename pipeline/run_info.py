"""A run folder's identity: RUN_DIR/run.json records the settings that decide its results.

Resumable jobs keep the results of one setting per folder: a rerun with other settings must not mix its
results into an earlier run's, so it compares its settings with the recorded ones first.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def changed_settings(path: Path, info: dict[str, Any]) -> list[str]:
    """The keys whose values differ between the settings recorded at `path` and `info` (none without a file)."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    return sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k))


def record_settings(path: Path, info: dict[str, Any]) -> None:
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
