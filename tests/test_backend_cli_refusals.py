"""The backend's command line refuses what it cannot serve with one `error:` line and exit 2 BEFORE Ray starts
and the actors load a model (seconds to minutes with real weights): a table name LanceDB refuses, a --db that is
a file, an address this machine does not have (binding it sends no traffic), a port already in use."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _backend(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "connectors", "--variant", "small", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["table", "db file", "host", "port in use"])
def test_what_the_backend_cannot_serve_is_refused_before_ray_starts(tmp_path, case):
    afile = tmp_path / "afile"
    afile.write_text("")
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = str(held.getsockname()[1])
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    free_port = str(free.getsockname()[1])
    free.close()
    args = {"table": ["--db", str(tmp_path / "db"), "--table", "../x", "--port", free_port],
            "db file": ["--db", str(afile), "--port", free_port],
            "host": ["--db", str(tmp_path / "db"), "--host", "192.0.2.1", "--port", free_port],
            "port in use": ["--db", str(tmp_path / "db"), "--host", "127.0.0.1", "--port", port]}[case]
    try:
        done = _backend(*args)
    finally:
        held.close()
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr
    assert "Started a local Ray" not in done.stderr and not (tmp_path / "db").exists()
