"""A run folder's identity: RUN_DIR/run.json records the settings that decide its results.

Resumable jobs keep the results of one setting per folder: a rerun with other settings must not mix its
results into an earlier run's, so it compares its settings with the recorded ones first. The record is
written whole (pipeline/files.py), so a kill or a second run never leaves it half written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import write_text_atomic


class RunInfoError(ValueError):
    """RUN_DIR/run.json exists but cannot be read (empty, cut short, not a JSON object)."""


def read_settings(path: Path) -> dict[str, Any] | None:
    """The settings recorded at `path`, None without a file; RunInfoError names the file and what to do."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise RunInfoError(unreadable_message(path, str(e))) from None
    try:
        old = json.loads(text)
    except ValueError as e:
        raise RunInfoError(unreadable_message(path, "empty file" if not text.strip() else f"invalid JSON: {e}")) from None
    if not isinstance(old, dict):
        raise RunInfoError(unreadable_message(path, f"a JSON {type(old).__name__}, not an object"))
    return old


def unreadable_message(path: Path, why: str) -> str:
    return (f"{path} cannot be read ({why}), so the settings of the run in {path.parent} are unknown. If that "
            f"folder holds a run of the settings you are using now, delete {path.name} and run again to resume "
            "it; otherwise start over in another folder")


def changed_settings(path: Path, info: dict[str, Any]) -> list[str]:
    """The keys whose values differ between the settings recorded at `path` and `info` (none without a file)."""
    old = read_settings(path)
    if old is None:
        return []
    return sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k))


def record_settings(path: Path, info: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(info, indent=2, sort_keys=True) + "\n")
