"""A real Label Studio 1.23.2 server for end-to-end tests, started headless from `.ls-venv`.

`ensure_label_studio` runs scripts/install_label_studio.sh when the venv is missing. The server gets
its own data folder, a free port on 127.0.0.1 and a legacy API token (shared/spec/integrations.md §3);
files under `files_root` are served as Label Studio local files. `LabelStudioServer.stop` ends only the
process this helper started. The session fixture `label_studio` (tests/conftest.py) starts one server
for every test module that needs it. Only the very first start in a venv migrates a database (30-240 s
on a loaded 2-core machine); it is kept as a template and copied, and a copy starts in seconds.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LS_VENV = Path(os.environ.get("LS_VENV", ROOT / ".ls-venv"))
LS_BIN = LS_VENV / "bin" / "label-studio"
TEMPLATE = LS_VENV / "test-db-template"  # a migrated database (and its token), copied by every start
USERNAME = "admin@example.com"
PASSWORD = "adminpass123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_label_studio() -> Path:
    """The label-studio executable, installed into LS_VENV first if it is not there."""
    if not (LS_BIN.is_file() and os.access(LS_BIN, os.X_OK)):
        done = subprocess.run(["bash", str(ROOT / "scripts" / "install_label_studio.sh")], cwd=ROOT,
                              capture_output=True, text=True, timeout=900, env={**os.environ, "LS_VENV": str(LS_VENV)})
        if done.returncode != 0 or not LS_BIN.is_file():
            raise RuntimeError(f"could not install Label Studio into {LS_VENV}:\n{done.stderr[-3000:]}")
    return LS_BIN


@dataclass
class LabelStudioServer:
    """A running server: its base URL, API token, file root and process."""

    url: str
    token: str
    files_root: Path
    data_dir: Path
    process: subprocess.Popen
    log_path: Path

    def client(self):
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.token)

    def env(self) -> dict[str, str]:
        """Environment variables that point label-studio-sdk based tools at this server."""
        return {"LABEL_STUDIO_URL": self.url, "LABEL_STUDIO_API_KEY": self.token}

    def stop(self) -> None:
        """Stop the server process this helper started (its own process group)."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def start_label_studio(workdir: Path, timeout_s: float = 600.0) -> LabelStudioServer:
    """Start Label Studio with its data under `workdir`; files under `workdir/files` are its local files.

    The database starts as a copy of a migrated template kept in the venv (made by the first call there),
    so only that first call waits for Label Studio's migrations; later ones start in seconds.
    """
    exe = ensure_label_studio()
    workdir = Path(workdir)
    files_root = workdir / "files"
    files_root.mkdir(parents=True, exist_ok=True)
    template, token = _template(exe, timeout_s)
    data_dir = workdir / "ls-data"
    shutil.copytree(template, data_dir)
    return _launch(exe, workdir, data_dir, files_root, token, timeout_s)


def _template(exe: Path, timeout_s: float) -> tuple[Path, str]:
    """(migrated data folder, its admin's API token), made once per Label Studio venv."""
    token_file = TEMPLATE / "token"
    if not token_file.exists():
        build = Path(tempfile.mkdtemp(dir=LS_VENV, prefix="test-db-build-"))
        try:
            token = secrets.token_hex(20)
            server = _launch(exe, build, build / "ls-data", build / "files", token, timeout_s)
            server.stop()
            (build / "token").write_text(token)
            try:
                os.rename(build, TEMPLATE)  # atomic: a concurrent session either wins or finds it made
            except OSError:
                pass
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return TEMPLATE / "ls-data", token_file.read_text().strip()


def _launch(exe: Path, workdir: Path, data_dir: Path, files_root: Path, token: str,
            timeout_s: float) -> LabelStudioServer:
    data_dir.mkdir(parents=True, exist_ok=True)
    files_root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_USERNAME": USERNAME,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LATEST_VERSION_CHECK": "false",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        "PYTHONPATH": "",  # Label Studio runs on its own venv's packages only
    }
    log_path = workdir / "label-studio.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(data_dir)],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = LabelStudioServer(f"http://127.0.0.1:{port}", token, files_root, data_dir, process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Label Studio exited with {process.returncode}; log:\n{_tail(log_path)}")
        if _ready(server):
            return server
        time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"Label Studio did not answer within {timeout_s:.0f} s; log:\n{_tail(log_path)}")


def _ready(server: LabelStudioServer) -> bool:
    request = urllib.request.Request(server.url + "/api/projects", headers={"Authorization": f"Token {server.token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return "<no log>"
