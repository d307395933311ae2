"""Ray token authentication for a driver started by `ray job submit`, decided before Ray is imported (Ray reads
RAY_AUTH_MODE then).

A Ray head enables token authentication when it is started with RAY_AUTH_MODE=token or on a machine holding a
token (~/.ray/auth_token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH); a driver sends its token only with
RAY_AUTH_MODE=token, and a driver in token mode cannot run actors on a cluster without authentication (they
die before they start). So the mode is never guessed for a driver that joins a cluster from elsewhere
(`--address`): the user's RAY_AUTH_MODE decides, and a mismatch is reported in a sentence
(pipeline.encode_run.explain_connect_error). Only a driver that `ray job submit` started on the head itself
turns the mode on when the head's token is at hand: that token is what made the head require it.
"""
from __future__ import annotations

import os

_SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint


def use_token_auth_when_available() -> None:
    """Under `ray job submit`, set RAY_AUTH_MODE=token when unset and a token is available; call before
    `import ray`."""
    if os.environ.get("RAY_AUTH_MODE") or _SUBMITTED_JOB_ENV not in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"
