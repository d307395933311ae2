"""The stall decision (pipeline/stall.py) that bounds a job's wait on a cluster that lost every node its workers
need: a pure function of the progress times, the placement answers and the timeout, checked against a direct
reading of its rule; and the watchdog thread the encode job runs around Ray Data's iterator, with a real signal
to a blocked main thread (in a process of its own)."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.stall import StallWatchdog, is_stalled, unplaceable_since

ROOT = Path(__file__).resolve().parents[1]

# an event after `dt` seconds: a result came back, or a check found a node for a worker (True) or none (False)
EVENTS = st.lists(st.tuples(st.floats(0.001, 50.0), st.sampled_from(["progress", True, False])), max_size=60)


def _stall_by_rule(events: list[tuple[float, object]], i: int, timeout: float) -> bool:
    """Stalled at check i: the unbroken run of "no node" checks ending at i (no result and no "a node can hold one"
    in between) began `timeout` or more before it."""
    j = i
    while j > 0 and events[j - 1][1] is False:
        j -= 1
    return events[i][1] is False and events[i][0] - events[j][0] >= timeout


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.floats(0.01, 200.0))
def test_a_stall_is_exactly_an_unbroken_stretch_of_no_node_and_no_result_as_long_as_the_timeout(steps, timeout):
    t, events = 0.0, []
    for dt, kind in steps:
        t += dt
        events.append((t, kind))
    since, last_progress = None, 0.0
    for i, (now, kind) in enumerate(events):
        if kind == "progress":
            last_progress = now
            continue
        since = unplaceable_since(since, last_progress, now, kind)
        stalled = is_stalled(since, now, timeout)
        assert stalled == _stall_by_rule(events, i, timeout), (events[: i + 1], timeout)
        if stalled:  # never while a node can hold a worker, nor within the timeout of a result
            assert kind is False and now - last_progress >= timeout


# The encode job's situation, in a process of its own (a real SIGTERM to the test runner's own main thread would
# depend on what earlier tests left in that process): its SIGTERM handler raises KeyboardInterrupt, its main thread
# waits without end, as Ray Data's iterator does for encoders no node can hold.
BLOCKED_MAIN = """
import signal, threading, time
from pipeline.stall import StallWatchdog

def stop(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, stop)
watchdog = StallWatchdog(lambda: False, 0.5, "encode", "image", "an encoder")
t0 = time.monotonic()
watchdog.start()
try:
    threading.Event().wait(120)
    print("NOT INTERRUPTED")
except KeyboardInterrupt:
    watchdog.stop()  # the interrupt has landed: nothing more is raised
    print("STOPPED", round(time.monotonic() - t0), watchdog._thread.is_alive(), watchdog.reason)
"""


def test_the_watchdog_stops_a_blocked_main_thread_when_no_node_can_hold_a_worker():
    done = subprocess.run([sys.executable, "-c", BLOCKED_MAIN], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    stopped = done.stdout.split()
    assert stopped[:1] == ["STOPPED"] and int(stopped[1]) < 60 and stopped[2] == "False", done.stdout
    assert "no live node of the cluster could hold an encoder" in done.stdout
    assert "encode: waiting: no image for" in done.stderr and "no live node can hold an encoder now" in done.stderr


def test_the_watchdog_never_fires_while_a_node_can_hold_a_worker():
    """However long no result comes (a clock that jumps 100 s per reading), a placeable worker is waited for."""
    clock = itertools.count(0.0, 100.0).__next__
    checks = []

    def placeable() -> bool:
        checks.append(1)
        return True

    watchdog = StallWatchdog(placeable, 0.25, "encode", "image", "an encoder", interrupt=lambda: checks.append(0),
                             clock=lambda: float(clock()))
    watchdog.start()
    deadline = time.monotonic() + 60
    while len(checks) < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    watchdog.stop()
    assert len(checks) >= 30 and 0 not in checks and watchdog.reason is None


def test_a_watchdog_stopped_before_the_timeout_never_interrupts():
    calls = []
    watchdog = StallWatchdog(lambda: False, 3600.0, "encode", "image", "an encoder",
                             interrupt=lambda: calls.append(1)).start()
    watchdog.stop()
    assert not watchdog._thread.is_alive() and calls == [] and watchdog.reason is None
