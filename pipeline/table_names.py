"""Which feature-table names LanceDB takes: a check light enough for any command line to run before it starts
Ray or imports Lance (pipeline.feature_store re-exports it)."""
from __future__ import annotations

import re

_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_table_name(name: str) -> str:
    """`name` if LanceDB takes it as a table name (letters, digits, `_`, `-`, `.`); ValueError saying why not."""
    if not _TABLE_NAME.fullmatch(name or ""):
        raise ValueError(f"invalid table name {name!r}: use only letters, digits, '_', '-' and '.'")
    return name
