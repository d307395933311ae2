"""Bounded waiting on a cluster that lost the nodes a job's workers need.

Ray queues an actor or task that no live node can hold without an error and without a deadline, and Ray Data
waits for its actor pool the same way ("The job may hang forever unless the cluster scales up"): a job whose
every worker node died would wait forever. Waiting for the cluster to recover is fine, but bounded and said:
while no result comes back AND no live node could hold a worker, a line says so every 30 s, and after
`stall_timeout_s` of that the job stops with `ClusterStalled`. A slow but placeable pool is never stopped.

The decision is two pure functions (`unplaceable_since`, `is_stalled`), shared by the worker pool of evaluation
and pre-annotation (pipeline/actor_pool.py), which waits in its own loop, and by the encode job, whose wait is
inside Ray Data's iterator: there `StallWatchdog`, a thread, watches progress and interrupts the main thread.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Callable

DEFAULT_STALL_TIMEOUT_S = 600.0  # no result and no node able to hold a worker for this long: the job stops
WAIT_LINE_S = 30.0  # how often a stalled wait says so
_MAX_CHECK_S = 5.0  # how often the watchdog looks at the cluster while no progress comes
_LANDING_S = 0.5  # how long `stop` gives an interrupt already sent to reach the main thread


def add_stall_timeout_argument(parser, result: str, worker: str, stops: str) -> None:
    """The --stall-timeout option, the same in the encode job, evaluation and pre-annotation: `result` and
    `worker` name what the job waits for ("image", "an encoder"), `stops` what the job does then."""
    from interformer.cli_types import POSITIVE

    parser.add_argument("--stall-timeout", type=POSITIVE, default=DEFAULT_STALL_TIMEOUT_S, metavar="S",
                        help=f"seconds to wait while no {result} comes back and no live node of the cluster can hold "
                        f"{worker} (every worker node lost; a line says so every 30 s): then {stops}, and a rerun "
                        "resumes. A slow worker on a live node is never stopped (default: %(default)s)")


class ClusterStalled(RuntimeError):
    """No result came back and no live node could hold a worker for the stall timeout (worker nodes lost)."""


def unplaceable_since(since: float | None, last_progress: float, now: float, placeable: bool) -> float | None:
    """When the current stall began, after a check at `now`: None when a live node can hold a worker
    (`placeable`); else `since` (the start found by the previous check), unless progress came after it or there
    was none, then `now`. A stall is an unbroken run of checks that found no node for a worker and no progress
    in between."""
    if placeable:
        return None
    if since is None or last_progress > since:
        return now
    return since


def is_stalled(since: float | None, now: float, timeout_s: float) -> bool:
    """Whether a stall that began at `since` (None: none) has lasted `timeout_s`."""
    return since is not None and now - since >= timeout_s


def _interrupt_main() -> None:
    # A real signal to the main thread, as a stop: it also wakes a blocking wait there (a flag alone, as
    # _thread.interrupt_main sets, is seen only at the next bytecode). SIGTERM, not SIGINT: the jobs that use the
    # watchdog install their own SIGTERM handler, while SIGINT is ignored in a job a shell started in the background.
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)


class StallWatchdog:
    """A thread that ends a wait the main thread cannot bound itself (a Ray Data iterator).

    The main thread calls `progress()` at each result. While none comes, the thread asks `placeable()` (whether
    a live node could hold a worker) every few seconds; it prints a line every 30 s while the answer is no, and
    once it has been no for `timeout_s` it records `reason` and interrupts the main thread with SIGTERM (its
    handler, which the caller makes raise KeyboardInterrupt, runs as for a stop: Ray's blocking waits check
    signals). The caller tells a stall from a user's stop by `reason`. `stop()` must run on every exit path: it
    ends the thread, and an interrupt already sent lands in `stop()` itself (as KeyboardInterrupt), never later."""

    def __init__(self, placeable: Callable[[], bool], timeout_s: float, job: str, result: str, worker: str,
                 interrupt: Callable[[], None] = _interrupt_main, clock: Callable[[], float] = time.monotonic,
                 line_every_s: float = WAIT_LINE_S) -> None:
        """`job`, `result` and `worker` name things in the lines: ("encode", "image", "an encoder")."""
        self._placeable, self._timeout = placeable, timeout_s
        self._job, self._result, self._worker = job, result, worker
        self._interrupt, self._clock, self._line_every = interrupt, clock, line_every_s
        self._check_s = max(0.05, min(_MAX_CHECK_S, timeout_s / 5))
        self._last = clock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self.reason: str | None = None

    def start(self) -> "StallWatchdog":
        self._last = self._clock()
        self._thread.start()
        return self

    def progress(self) -> None:
        """A result came back."""
        self._last = self._clock()

    def stop(self) -> None:
        """End the watch. If the thread already interrupted the main thread and that interrupt is still pending,
        it is raised here (KeyboardInterrupt), inside the caller's try, not in whatever runs next."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()  # a thread that saw no stop yet may still interrupt: wait for it to end
        if self.reason is not None:
            deadline = time.monotonic() + _LANDING_S
            while time.monotonic() < deadline:  # a pending interrupt is taken between two of these bytecodes
                time.sleep(0.01)

    def _safe_placeable(self) -> bool:
        try:
            return bool(self._placeable())
        except Exception:  # noqa: BLE001 - a check that fails says nothing: never stop a run on it
            return True

    def _watch(self) -> None:
        since: float | None = None
        said: float | None = None
        while not self._stopped.wait(self._check_s):
            now, last = self._clock(), self._last
            placeable = now - last < self._check_s or self._safe_placeable()  # progress since the last check
            since = unplaceable_since(since, last, now, placeable)
            if since is None:
                said = None
                continue
            if is_stalled(since, now, self._timeout):
                if not self._stopped.is_set():
                    self.reason = (f"no {self._result} came back for {now - last:.0f} s and no live node of the "
                                   f"cluster could hold {self._worker} for {now - since:.0f} s (worker nodes lost?)")
                    self._interrupt()
                return
            if said is None or now - said >= self._line_every:
                print(f"{self._job}: waiting: no {self._result} for {now - last:.0f} s; no live node can hold "
                      f"{self._worker} now (giving up after {self._timeout:.0f} s of that)", file=sys.stderr,
                      flush=True)
                said = now
