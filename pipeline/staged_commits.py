"""The encode job's commit protocol: written work is staged as records beside the table, and committed
exactly once.

  write task   1. writes its feature rows as uncommitted Lance fragments (invisible to readers)
               2. stages one record (JSON, written whole then renamed into place) under <root>/<table>_staged/:
                  the fragments with the image ids they hold, and the inputs that failed, with their reason
  committer    3. commits every staged record's fragments in one exactly-once commit
                  (FeatureStore.commit_fragments: a repeated commit adds nothing, a second writer neither)
               4. records the failures in the errors table (keyed, so repeating it changes nothing)
               5. deletes the records it committed

A process that dies anywhere in 1-5 leaves either nothing visible (the next run encodes the images
again) or records that any later commit completes: the next run starts by committing what an earlier
run staged, so written work is not lost either. The driver commits on a timer, whatever the pace of
Ray Data's results (`CommitTimer`), and once more when it stops.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from pyarrow import fs as pafs

from .faults import fault_point
from .feature_store import FeatureStore, WrittenFragment, error_rows
from .sources import is_uri

STAGED_SUFFIX = "_staged"


@dataclass
class StagedRecord:
    """What one write task produced: fragments to commit and the inputs that failed (id, uri, reason, detail)."""

    fragments: list[WrittenFragment]
    errors: list[tuple[str, str, str, str]]
    fingerprint: str

    def to_json(self) -> str:
        return json.dumps({"fingerprint": self.fingerprint, "fragments": [f.to_dict() for f in self.fragments],
                           "errors": [list(e) for e in self.errors]})

    @classmethod
    def from_json(cls, text: str) -> "StagedRecord":
        d = json.loads(text)
        return cls([WrittenFragment.from_dict(f) for f in d["fragments"]], [tuple(e) for e in d["errors"]],
                   d["fingerprint"])


def staging_uri(store: FeatureStore) -> str:
    """Where write tasks stage their records for `store`: a folder beside the table."""
    return store.features_uri[: -len(".lance")] + STAGED_SUFFIX


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def stage(uri: str, record: StagedRecord, storage_options: dict | None = None) -> str:
    """Write `record` under the staging folder `uri`, whole or not at all (written aside, then renamed)."""
    del storage_options  # object stores: credentials come from the environment, as for reading images
    filesystem, base = _filesystem(uri)
    filesystem.create_dir(base, recursive=True)
    name = f"{uuid.uuid4().hex}.json"
    tmp = f"{base}/.{name}.tmp"
    with filesystem.open_output_stream(tmp) as out:
        out.write(record.to_json().encode())
    filesystem.move(tmp, f"{base}/{name}")
    return f"{base}/{name}"


def read_staged(uri: str) -> list[tuple[str, StagedRecord]]:
    """Every whole record under the staging folder, oldest name first (partial `.tmp` files are skipped)."""
    filesystem, base = _filesystem(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    records = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        try:
            with filesystem.open_input_stream(info.path) as f:
                text = f.read().decode()
        except FileNotFoundError:  # another committer (a second run on the table) committed and unstaged it
            continue
        records.append((info.path, StagedRecord.from_json(text)))
    return records


def unstage(uri: str, paths: list[str]) -> None:
    """Delete committed records; one already deleted by another committer of the same table is not an error
    (both committed the same fragments exactly once, and either may unstage them)."""
    filesystem, _ = _filesystem(uri)
    for path in paths:
        try:
            filesystem.delete_file(path)
        except FileNotFoundError:
            pass


@dataclass
class CommitTally:
    """What a committer did: images stored (once each), failures recorded, commits and bytes."""

    stored: set[tuple[str, str]] = field(default_factory=set)
    present: set[tuple[str, str]] = field(default_factory=set)
    failed: dict[tuple[str, str], dict] = field(default_factory=dict)
    commits: int = 0
    nbytes: int = 0


class StagedCommitter:
    """Commits the records staged for one feature table (steps 3-5 above); thread-safe."""

    def __init__(self, store: FeatureStore, uri: str | None = None, index_interval_s: float = 300.0):
        self.store = store
        self.uri = uri or staging_uri(store)
        self.tally = CommitTally()
        self.index_interval_s = index_interval_s
        self._indexed_at = time.monotonic()
        self._lock = threading.Lock()

    def commit_staged(self) -> int:
        """Commit every record staged so far; returns how many records were committed."""
        with self._lock:
            records = read_staged(self.uri)
            if not records:
                return 0
            fault_point("staged")
            fragments = [f for _, r in records for f in r.fragments]
            outcome = self.store.commit_fragments(fragments)
            added = set(outcome.added)
            self.tally.commits += bool(added)
            self.tally.stored.update(added, outcome.recommitted)
            self.tally.present.update(outcome.present)
            self.tally.nbytes += sum(f.nbytes for f in fragments if any((i, f.fingerprint) in added for i in f.image_ids))
            self._record_errors([r for _, r in records], outcome.added)
            fault_point("errors_recorded")
            unstage(self.uri, [path for path, _ in records])
            fault_point("unstaged")
            if time.monotonic() - self._indexed_at >= self.index_interval_s:  # keep fetches by id indexed
                self.store.optimize_index()  # here, under the lock: never alongside a commit of this process
                self._indexed_at = time.monotonic()
            return len(records)

    def _record_errors(self, records: list[StagedRecord], added: list[tuple[str, str]]) -> None:
        for fp in {r.fingerprint for r in records}:
            errors = [e for r in records if r.fingerprint == fp for e in r.errors]
            if errors:
                self.store.record_errors(error_rows(errors, fp))
                self.tally.failed.update(
                    ((e[0], fp), {"image_id": e[0], "uri": e[1], "reason": e[2], "detail": e[3]}) for e in errors
                )
            fixed = {i for i, f in added if f == fp} & set(self.store.errors(fp).column("image_id").to_pylist())
            if fixed:
                self.store.clear_errors(fixed, fp)


class CommitTimer:
    """Runs `committer.commit_staged()` every `interval` seconds on a thread, independent of when Ray Data
    hands results to the driver; `stop()` waits for a commit in progress, then commits what is left.

    A tick that fails (a second run committing the same table, a storage hiccup) is logged and retried at the
    next tick: its records stay staged, so nothing is lost, and one transient error does not stop the timer
    for the rest of the run. Only the final commit in `stop()` raises, since after it nothing would retry."""

    def __init__(self, committer: StagedCommitter, interval: float):
        self.committer = committer
        self.interval = max(0.05, interval)
        self.failed_ticks = 0
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="commit-timer", daemon=True)

    def start(self) -> "CommitTimer":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def tick(self) -> None:
        """One timed commit; an error is logged and left to the next tick (the records stay staged)."""
        try:
            self.committer.commit_staged()
        except Exception as e:
            self.failed_ticks += 1
            self.last_error = e
            print(f"encode: a timed commit failed ({type(e).__name__}: {str(e)[:300]}); its work stays staged "
                  "and the next commit retries it", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.committer.commit_staged()
