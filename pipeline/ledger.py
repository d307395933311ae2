"""An append-only JSON-lines ledger: what a resumable job has finished, one record per line.

Each record is written with one `write` and flushed to disk before the job moves on, so a kill loses
at most the line being written; `read` drops such a torn last line (and truncates it away when asked
to repair), so the next run appends cleanly after the last whole record.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


class LedgerError(RuntimeError):
    """A ledger line other than the last is not valid JSON: the file was edited or is not a ledger."""


class Ledger:
    """Records (JSON objects) of one run, in the order they were appended."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def read(self, repair: bool = False) -> list[dict[str, Any]]:
        """Every whole record. A last line without its newline was never acknowledged (a torn write): it is
        ignored, and cut off the file with `repair`. A bad line before that raises LedgerError."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records: list[dict[str, Any]] = []
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                if repair:
                    with open(self.path, "r+b") as f:
                        f.truncate(pos)
                break
            line = data[pos:nl]
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    line_no = data.count(b"\n", 0, pos) + 1
                    raise LedgerError(f"{self.path}: line {line_no} is not valid JSON ({e}); is it a ledger?") from None
            pos = nl + 1
        return records

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.read())

    def append(self, record: dict[str, Any]) -> None:
        """Append one record and make it durable before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with open(self.path, "ab") as f:
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
