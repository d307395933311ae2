"""Deterministic fault injection at named steps of the commit protocol, for tests only.

Production code calls `fault_point("step")` where a crash would matter. Nothing happens unless the
environment variable INTERFORMER_FAULT names that step (only tests set it):

    INTERFORMER_FAULT="committed:exit"      the process dies (os._exit) at the first pass through "committed"
    INTERFORMER_FAULT="checked:raise:2"     KeyboardInterrupt (as a Ctrl-C or a SIGTERM would raise) at the 2nd pass
    INTERFORMER_FAULT="written:oserror:2"   OSError "No space left on device" at the 2nd pass (a storage failure)
    INTERFORMER_FAULT="written:hold:2"      from the 2nd pass on, each process writes INTERFORMER_FAULT_DIR/held-<pid>
                                            and waits there until INTERFORMER_FAULT_DIR/release exists: a test acts
                                            on that event (kills a node, stops the job) while the run is provably in
                                            the middle, with exactly the work before the 2nd pass done

Passes are counted per process, or across all processes when INTERFORMER_FAULT_DIR names a folder they
share. The variable is read at each call, so a test may set it in-process, and it reaches Ray workers and
subprocesses through their environment.
"""
from __future__ import annotations

import errno
import os
import sys
import threading
import time

FAULT_ENV = "INTERFORMER_FAULT"
FAULT_DIR_ENV = "INTERFORMER_FAULT_DIR"
FAULT_EXIT_CODE = 97  # an exit status nothing else in the project uses: a test can tell its fault from a crash

_passes: dict[str, int] = {}
_lock = threading.Lock()


class InjectedFault(KeyboardInterrupt):
    """Raised at the named step in "raise" mode; a KeyboardInterrupt so that it takes the path of a real stop."""


def fault_point(step: str) -> None:
    """Die or raise here when INTERFORMER_FAULT names `step` (and this is the pass it names)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != step:
        return
    mode, _, nth = rest.partition(":")
    n = _count_pass(step)
    if n < int(nth or 1) or (n > int(nth or 1) and mode != "hold"):
        return
    if mode == "exit":
        sys.stderr.write(f"fault injection: exiting at {step!r}\n")
        sys.stderr.flush()
        os._exit(FAULT_EXIT_CODE)
    if mode == "raise":
        raise InjectedFault(f"fault injected at {step!r}")
    if mode == "oserror":
        raise OSError(errno.ENOSPC, f"No space left on device (fault injected at {step!r})")
    if mode == "hold":
        _hold(os.environ[FAULT_DIR_ENV])
        return
    raise ValueError(f"{FAULT_ENV}={spec!r}: the mode must be 'exit', 'raise', 'oserror' or 'hold'")


def _count_pass(step: str) -> int:
    """This pass's number: per process, or across processes when INTERFORMER_FAULT_DIR names a shared folder
    (each pass claims the next free file name there)."""
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        with _lock:
            _passes[step] = _passes.get(step, 0) + 1
            return _passes[step]
    n = 1
    while True:
        try:
            os.close(os.open(os.path.join(folder, f"pass-{step}-{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            n += 1


def _hold(folder: str) -> None:
    with open(os.path.join(folder, f"held-{os.getpid()}"), "w"):
        pass
    release = os.path.join(folder, "release")
    while not os.path.exists(release):
        time.sleep(0.05)


def reset_fault_counts() -> None:
    """Forget how often each step was passed (tests that inject several faults in one process)."""
    with _lock:
        _passes.clear()
