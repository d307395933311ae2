"""Ray token authentication for a driver, decided before Ray is imported (Ray reads RAY_AUTH_MODE then).

A Ray head enables token authentication when it is started with RAY_AUTH_MODE=token or finds a token
(~/.ray/auth_token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH); a driver sends its token only with
RAY_AUTH_MODE=token. A driver started by `ray job submit` on such a head inherits the token file but not
always the mode, so it turns the mode on when a token is at hand. Clusters without authentication accept
a token too, so this never locks a driver out; a cluster that needs a token this machine lacks is
reported by the caller in a sentence (pipeline.encode_run.explain_connect_error).
"""
from __future__ import annotations

import os


def use_token_auth_when_available() -> None:
    """Set RAY_AUTH_MODE=token when unset and a token is available; call before `import ray`."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"
