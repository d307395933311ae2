"""Joining or starting Ray for a batch job, the same way for every job.

`init_ray(address)` joins the cluster named by `address` (or by RAY_ADDRESS, which `ray job submit` sets
for its entrypoint), else starts a private local Ray for this process. A private Ray is retried when its
raylet misses Ray's fixed 30 s registration window (it does on overloaded hosts), gets a free metrics
port (two jobs on one machine must not fight over the default one) and passive OpenMP waits (batch
workers must not spin against the interactive backend's actors on a shared node).

Token authentication: a Ray head enables it when started with RAY_AUTH_MODE=token or on a machine holding
a token (~/.ray/auth_token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH); a driver sends its token only with
RAY_AUTH_MODE=token, which Ray reads when it is first imported, and a token-mode driver cannot run actors
on a cluster without authentication (they die before they start: reproduced). So the mode is never
guessed for a driver that joins a cluster from elsewhere (`--address`): the user's RAY_AUTH_MODE decides,
and a mismatch is reported in a sentence (`explain_connect_error`). Only a driver that `ray job submit`
started on the head itself turns it on when the head's token is at hand (`use_ray_auth_token`, called by
`prepare_job_process` before anything imports Ray).

`prepare_job_process(script)` is the first statement of every job: a job started by an interpreter that
lacks the project's dependencies (`ray job submit -- python jobs/X.py` runs whatever `python` the head
node finds; `--working-dir` makes this package importable, not torch) exits with a message naming the
interpreter and the fix instead of an import traceback. It only looks modules up, so it costs nothing.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import sys
import threading
import warnings

LOCAL = "local"
_START_ATTEMPTS = 3
REQUIRED_MODULES = ("numpy", "torch", "cv2", "PIL", "pyarrow", "ray", "lance", "lancedb", "pycocotools", "tqdm")
WRONG_INTERPRETER_EXIT = 3


class RayStartError(RuntimeError):
    """Ray could not be started or joined."""


class RayConnectError(RayStartError):
    """The Ray cluster cannot be joined (wrong address, authentication mismatch)."""

_SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint


def prepare_job_process(script: str) -> None:
    """Exit (status 3) with a clear message when this interpreter lacks the project's dependencies; then
    decide Ray's token mode (before anything imports Ray)."""
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        sys.stderr.write(
            f"error: this interpreter ({sys.executable}) lacks the project's packages ({', '.join(missing)}). "
            "With `ray job submit`, the entrypoint runs in the head node's environment: start the head from the "
            "project's virtual environment, or name its python explicitly "
            f"(`-- /path/to/.venv/bin/python {script} ...`).\n")
        raise SystemExit(WRONG_INTERPRETER_EXIT)
    use_ray_auth_token()


def use_ray_auth_token() -> None:
    """Under `ray job submit`, set RAY_AUTH_MODE=token when unset and a token is at hand; call before
    `import ray`. Elsewhere the user's RAY_AUTH_MODE decides."""
    if os.environ.get("RAY_AUTH_MODE") or _SUBMITTED_JOB_ENV not in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else RAY_ADDRESS; None (or "local") means a private local Ray."""
    chosen = address or os.environ.get("RAY_ADDRESS")
    return None if chosen in (None, "", LOCAL) else chosen


def init_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = True,
             job: str = "job") -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a private local Ray with `num_cpus` CPUs.

    Raises RayStartError when the private Ray does not come up after retries; `job` names the caller in
    the retry messages. The caller's SIGTERM handler is kept: joining Ray installs its own, which ends the
    driver at once (or aborts it, exit -6), before the job can commit, clean up or say what it kept."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        _init_ray(address, num_cpus, log_to_driver, job)
    finally:
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def _init_ray(address: str | None, num_cpus: int | None, log_to_driver: bool, job: str) -> None:
    use_ray_auth_token()
    import ray

    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
    joined = cluster_address(address)
    if joined is not None:
        check_reachable(joined)
        try:
            ray.init(address=joined, log_to_driver=log_to_driver)
        except Exception as e:  # Ray raises plain exceptions of several types for a cluster it cannot join
            raise RayConnectError(explain_connect_error(joined, e)) from None
        return
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # workers import this very package
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)}
    for attempt in range(1, _START_ATTEMPTS + 1):
        try:
            ray.init(address=LOCAL, num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                     runtime_env={"env_vars": env}, _metrics_export_port=free_port())
            return
        except Exception as e:
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == _START_ATTEMPTS:
                raise RayStartError(f"could not start a local Ray: {e}") from None
            print(f"{job}: the local Ray did not come up in time (attempt {attempt}); trying again",
                  file=sys.stderr, flush=True)


def live_node_resources() -> list[dict[str, float]]:
    """The resources of each live node of the joined cluster (what pipeline/placement.py checks against)."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """RayConnectError at once when nothing accepts connections at a `host:port` cluster address: `ray.init`
    would retry such an address for minutes. Other forms ("auto", "ray://...") are left to Ray."""
    if "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise RayConnectError(f"cannot join the Ray cluster at {address}: give it as HOST:PORT (the GCS address "
                              "`ray start --head` prints)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or type(e).__name__)
        raise RayConnectError(f"cannot join the Ray cluster at {address}: nothing answers there ({reason}); start "
                              "the head (`ray start --head`) or give the address it prints") from None


def explain_connect_error(address: str, error: BaseException) -> str:
    """A sentence for a failed `ray.init(address=...)`, with the fix for an authentication mismatch."""
    text = f"{type(error).__name__}: {error}"
    first = text.strip().splitlines()[0][:300]
    if "auth" in text.lower() or "token" in text.lower():
        if os.environ.get("RAY_AUTH_MODE") == "token":
            hint = ("RAY_AUTH_MODE=token is set: the cluster must use token authentication and this machine must "
                    "hold its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). For a cluster "
                    "started with a plain `ray start --head`, unset RAY_AUTH_MODE.")
        else:
            hint = ("the cluster uses token authentication: set RAY_AUTH_MODE=token and give its token "
                    "(RAY_AUTH_TOKEN=... or the file ~/.ray/auth_token copied from the head).")
        return f"cannot join the Ray cluster at {address}: authentication failed ({first}).\n{hint}"
    return f"cannot join the Ray cluster at {address}: {first}"
