"""One writer per training run folder: an exclusive lock on <out_dir>/writer.lock.

The trainer (rank 0) holds the lock while it writes checkpoints and logs. A second run in the same folder
(a rerun started while a killed driver's Ray worker is still training, two commands by mistake) is refused
with the holder's pid and host instead of interleaving rows in log.csv. The lock is an flock: the kernel
drops it when the holder's process ends, however it ends, so a crash never leaves a stale lock behind; the
pid/host/start time written into the file only explain who holds it.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..file_locks import flock_within

LOCK_FILE = "writer.lock"
_HELD_FDS: set[int] = set()  # lock fds of this process, closed in forked children (see close_inherited_locks)


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's writer lock."""


class RunFolderLock:
    """Exclusive right to write a run folder; `acquire` raises RunFolderBusy when another process has it."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.2) -> None:
        """Take the lock, waiting up to `wait_s` seconds for a holder to exit."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not flock_within(fd, wait_s, max_poll_s=poll_s):
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderBusy(busy_message(self.out_dir, holder))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        _HELD_FDS.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            _HELD_FDS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def close_inherited_locks(*_: object) -> None:
    """Close, in a forked child (a DataLoader worker: use as its worker_init_fn), the lock fds inherited from
    the writer. An flock lives as long as any process holds its file open, so otherwise a worker that outlives
    a killed writer would keep the run folder locked."""
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # the holder has not written its details yet
        return {}


def liveness(holder: dict) -> str:
    """Whether the recorded holder still runs (known on this host only)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ("; that process has exited, so a process it started (e.g. a data-loader worker) still has the "
                "lock file open")
    except PermissionError:
        pass
    return "; it is still running"


def busy_message(out_dir: Path, holder: dict) -> str:
    who = (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')}){liveness(holder)}"
           if holder else "another process")
    return (f"{out_dir} is being written by {who}. A run folder has one writer at a time: wait until that process "
            "has exited (a killed driver's Ray training worker can go on for a few seconds) or stop it, then run "
            "again; or use another --out-dir.")
