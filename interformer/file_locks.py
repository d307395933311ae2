"""Waiting for an exclusive `flock` with a deadline, shared by the run-folder lock and the engine cache's lock."""
from __future__ import annotations

import fcntl
import time


def flock_within(fd: int, wait_s: float, max_poll_s: float = 0.5) -> bool:
    """Take an exclusive flock on `fd`, trying again (after 10 ms, doubling up to `max_poll_s`) for at most
    `wait_s` seconds: True when taken, False when another holder kept it that long. Any other OSError (a
    filesystem without locks) is the caller's to handle."""
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(delay, max_poll_s))
            delay *= 2
