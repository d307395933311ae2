"""Joining or starting Ray for a batch job, the same way for every job.

`init_ray(address)` joins the cluster named by `address` (or by RAY_ADDRESS, which `ray job submit` sets
for its entrypoint), else starts a private local Ray for this process. A private Ray is retried when its
raylet misses Ray's fixed 30 s registration window (it does on overloaded hosts), gets a free metrics
port (two jobs on one machine must not fight over the default one) and passive OpenMP waits (batch
workers must not spin against the interactive backend's actors on a shared node).

Token authentication: Ray 2.60 clusters started with `ray start --head` require a token, but a client
sends one only with RAY_AUTH_MODE=token, which Ray reads when it is first imported. `init_ray` turns it
on when a token is at hand before importing Ray; a job that imports Ray earlier calls
`use_ray_auth_token()` first.

`prepare_job_process(script)` is the first statement of every job: a job started by an interpreter that
lacks the project's dependencies (`ray job submit -- python jobs/X.py` runs whatever `python` the head
node finds; `--working-dir` makes this package importable, not torch) exits with a message naming the
interpreter and the fix instead of an import traceback. It only looks modules up, so it costs nothing.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
import warnings

LOCAL = "local"
_START_ATTEMPTS = 3
REQUIRED_MODULES = ("numpy", "torch", "cv2", "PIL", "pyarrow", "ray", "lance", "lancedb", "pycocotools", "tqdm")
WRONG_INTERPRETER_EXIT = 3


class RayStartError(RuntimeError):
    """A private local Ray could not be started."""


def prepare_job_process(script: str) -> None:
    """Exit (status 3) with a clear message when this interpreter lacks the project's dependencies; then turn
    on Ray token authentication when a token is at hand (before anything imports Ray)."""
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
    """Set RAY_AUTH_MODE=token when a Ray token exists (env or ~/.ray/auth_token) and no mode is set;
    clusters without authentication accept it too."""
    if os.environ.get("RAY_AUTH_MODE"):
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
    the retry messages."""
    use_ray_auth_token()
    import ray

    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
    joined = cluster_address(address)
    if joined is not None:
        ray.init(address=joined, log_to_driver=log_to_driver)
        return
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
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
