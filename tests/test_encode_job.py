"""The encode job end to end: a real Ray head (`ray start --head`), `ray job submit`, a real LanceDB folder,
an image folder with corrupt files mixed in, runs killed midway (the driver, an encoder worker) and re-run.
Plus the in-process pieces (stages, resource plan, --help) without Ray."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from interformer.config import PreprocessConfig
from pipeline.encoding import EncoderSpec, EncoderStage, build_predictor, decode_stage, plan_resources, write_stage
from pipeline.feature_store import FeatureStore
from pipeline.images import decode_image

ROOT = Path(__file__).resolve().parents[1]
ENCODE = ROOT / "jobs" / "encode.py"
MAX_PIXELS = 210_000
BAD = {"broken.jpg": "truncated", "empty.png": "empty", "notes.png": "not_an_image", "huge.png": "too_large"}
COMMON = ["--variant", "small", "--max-pixels", str(MAX_PIXELS)]


# --- fixtures -------------------------------------------------------------------------------------


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth image with some texture (random noise alone would be an odd input)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / (7 + c * 3) + seed) * np.cos(yy / (5 + c)) for c in range(3)], axis=2)
    img = 127.5 + 100 * base + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> tuple[Path, list[str]]:
    """32 good images in nested folders (PNG and JPEG, three sizes) and the four kinds of bad file. The images
    are large enough for encoding to dominate a run, so that kills land while the encoder is busy."""
    root = tmp_path_factory.mktemp("collection") / "images"
    good = []
    sizes = [(448, 448), (384, 512), (416, 320)]
    for n in range(32):
        h, w = sizes[n % 3]
        rel = f"set{n % 4}/img_{n:03d}." + ("png" if n % 2 else "jpg")
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(h, w, n)).save(path, quality=92)
        good.append(rel)
    buf = io.BytesIO()
    Image.fromarray(_image(200, 200, 99)).save(buf, "JPEG")
    (root / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("not an image\n")
    Image.fromarray(_image(480, 480, 98)).save(root / "huge.png")  # 230,400 pixels > MAX_PIXELS
    return root, sorted(good)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", *args]


@pytest.fixture(scope="module")
def ray_head():
    """A private Ray head on 127.0.0.1 (2 CPUs, free ports, its own temp dir), for this module's tests only."""
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
    ports = {
        name: _free_port()
        for name in ("port", "dashboard-port", "node-manager-port", "object-manager-port", "ray-client-server-port",
                     "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                     "runtime-env-agent-port")
    }
    cmd = _ray_cli("start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
                   "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats",
                   f"--temp-dir={temp_dir}", *[f"--{k}={v}" for k, v in ports.items()])
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 without a token: the dashboard is up
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                _stop_session(head)
                pytest.fail("the Ray head did not start:\n" + Path(log.name).read_text()[-3000:])
            time.sleep(0.3)
    yield {"url": url, "gcs": f"127.0.0.1:{ports['port']}", "sid": head.pid}
    _stop_session(head)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_session(head: subprocess.Popen) -> None:
    """Kill every process of the head's session (all started by this fixture), quickly."""
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(30)
    left = subprocess.run(["pgrep", "-s", str(head.pid)], capture_output=True, text=True).stdout.split()
    for pid in left:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _submit(url: str, args: list[str], *, wait: bool = True, submission_id: str | None = None) -> subprocess.CompletedProcess:
    """`RAY_AUTH_MODE=token ray job submit --working-dir <repo> -- <this python> jobs/encode.py ...`."""
    cmd = _ray_cli("job", "submit", "--address", url, "--working-dir", str(ROOT), "--entrypoint-num-cpus", "0")
    if submission_id:
        cmd += ["--submission-id", submission_id]
    if not wait:
        cmd.append("--no-wait")
    cmd += ["--", sys.executable, "jobs/encode.py", *args]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _wait_for_job(url: str, submission_id: str, timeout: float = 240) -> str:
    """Poll `ray job status` until the job ends; returns SUCCEEDED, FAILED or STOPPED."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(_ray_cli("job", "status", "--address", url, submission_id), capture_output=True,
                             text=True, env={**os.environ, "RAY_AUTH_MODE": "token"}, timeout=60)
        ended = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", out.stdout + out.stderr)
        if ended:
            return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[ended.group(1)]
        time.sleep(1)
    pytest.fail(f"job {submission_id} did not finish in {timeout} s")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _wait_for_rows(uri: str, minimum: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            n = lance.dataset(uri).count_rows()
        except (ValueError, OSError):
            n = 0
        if n >= minimum:
            return n
        time.sleep(0.05)
    pytest.fail(f"no {minimum} rows in {uri} after {timeout} s")


def _pids(pattern: str, session: int | None = None) -> list[int]:
    cmd = ["pgrep", "-f", pattern] + (["-s", str(session)] if session else [])
    return [int(p) for p in subprocess.run(cmd, capture_output=True, text=True).stdout.split()]


@contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reference(root: Path, ids: list[str], preprocess: PreprocessConfig = PreprocessConfig()) -> dict:
    """In-process `Predictor.encode` of each image, one at a time on one thread (as the job's 1-CPU actor)."""
    predictor = build_predictor(EncoderSpec(variant="small", preprocess=preprocess), device="cpu")
    with _torch_threads(1):
        return {i: predictor.encode(decode_image((root / i).read_bytes())) for i in ids}


def _assert_exactly_once(store: FeatureStore, fingerprint: str, good: list[str]) -> None:
    ids = store.dataset().to_table(columns=["image_id"], filter=f"fingerprint = '{fingerprint}'").column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows"
    assert sorted(ids) == good, "missing or unexpected rows"
    errors = {e["image_id"]: e["reason"] for e in store.errors(fingerprint).to_pylist()}
    assert errors == BAD


FINGERPRINT = "small:random-init:max_side=None:div=32"


# --- end to end on a Ray cluster ------------------------------------------------------------------


@pytest.mark.slow
def test_submitted_job_killed_twice_then_rerun_is_exactly_once_and_bit_exact(ray_head, collection, tmp_path):
    """Run 1 loses its driver (SIGKILL) after its first commit; run 2 loses its encoder actor midway; what
    runs after finishes the table: every good image once, fp32 rows equal to Predictor.encode bit for bit."""
    root, good = collection
    db = tmp_path / "db"
    uri = str(db / "features.lance")
    summary_path = tmp_path / "summary.json"
    args = [str(root), "--db", str(db), *COMMON, "--dtype", "float32", "--batch-size", "1", "--write-batch", "1",
            "--commit-interval", "0", "--summary-json", str(summary_path)]

    started = _submit(ray_head["url"], args, wait=False, submission_id=f"encode-a-{uuid.uuid4().hex[:8]}")
    assert started.returncode == 0, started.stderr[-3000:]
    _wait_for_rows(uri, 1)
    drivers = [pid for pid in _pids(str(db)) if _cmdline(pid)[:2] == [sys.executable, "jobs/encode.py"]]
    assert drivers, "driver process not found"
    for pid in drivers:
        os.kill(pid, signal.SIGKILL)  # no chance to commit what is in flight
    killed_at = lance.dataset(uri).count_rows()
    assert 0 < killed_at < len(good) - 8, f"the driver kill did not land early ({killed_at} of {len(good)} rows)"

    second = f"encode-b-{uuid.uuid4().hex[:8]}"
    started = _submit(ray_head["url"], args, wait=False, submission_id=second)
    assert started.returncode == 0, started.stderr[-3000:]
    busy_since, deadline = None, time.monotonic() + 240
    while True:  # kill the encoder actor once it has been encoding for a second (mid-batch, mid-run)
        assert time.monotonic() < deadline, "run 2's encoder never started"
        busy = [pid for pid in _pids("EncoderStage", ray_head["sid"]) if ".submit" in " ".join(_cmdline(pid))]
        busy_since = (busy_since or time.monotonic()) if busy else None
        if busy_since and time.monotonic() - busy_since > 1.0:
            break
        time.sleep(0.05)
    for pid in busy:
        os.kill(pid, signal.SIGKILL)
    assert lance.dataset(uri).count_rows() < len(good), "the worker kill did not land midway"
    status = _wait_for_job(ray_head["url"], second)
    if status != "SUCCEEDED":  # Ray Data could not recover from the lost actor: a re-run finishes the work
        rerun = _submit(ray_head["url"], args)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]

    summary = json.loads(summary_path.read_text())
    assert summary["fingerprint"] == FINGERPRINT and summary["random_weights"]
    assert summary["skipped"] + summary["encoded"] == len(good) and summary["skipped"] >= killed_at
    assert summary["bytes_written"] > 0 and summary["encoded"] > 0
    store = FeatureStore(str(db))
    _assert_exactly_once(store, FINGERPRINT, good)
    reader = store.reader(FINGERPRINT)
    for image_id, want in _reference(root, good).items():
        rec = reader.get_record(image_id)
        assert rec.dtype == "float32" and rec.features.geometry == want.geometry
        assert rec.uri == str(root / image_id)
        assert rec.content_sha256 == hashlib.sha256((root / image_id).read_bytes()).hexdigest()
        for got, ref in zip(rec.features.pyramid, want.pyramid):
            assert torch.equal(got, ref), f"{image_id}: stored fp32 features differ from Predictor.encode"

    again = subprocess.run([sys.executable, str(ENCODE), str(root), "--db", str(db), *COMMON],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"skipped      {len(good)}" in again.stdout and "known bad    4" in again.stdout
    assert "Started a local Ray" not in again.stderr  # nothing to do: no cluster at all
    _assert_exactly_once(store, FINGERPRINT, good)


@pytest.mark.slow
def test_local_run_fp16_and_a_run_that_encodes_nothing(ray_head, collection, tmp_path):
    """`python jobs/encode.py DIR` with no cluster: a private local Ray, the table under ./lancedb, fp16 rows
    within rounding of Predictor.encode. Then a run (joining a cluster by --address) with only bad files
    exits non-zero."""
    root, good = collection
    subset = tmp_path / "subset"
    for rel in good[:8] + list(BAD):
        (subset / rel).parent.mkdir(parents=True, exist_ok=True)
        (subset / rel).write_bytes((root / rel).read_bytes())
    run = subprocess.run([sys.executable, str(ENCODE), str(subset), *COMMON, "--batch-size", "4", "--num-cpus", "2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "RANDOMLY INITIALISED" in run.stderr and "Started a local Ray" in run.stderr
    store = FeatureStore(str(tmp_path / "lancedb"))  # the default location, under the working directory
    _assert_exactly_once(store, FINGERPRINT, good[:8])
    reader = store.reader(FINGERPRINT)
    for image_id, want in _reference(subset, good[:8]).items():
        rec = reader.get_record(image_id)
        assert rec.dtype == "float16"
        for got, ref in zip(rec.features.pyramid, want.pyramid):
            # half an fp16 ulp, plus the fp32 noise of batched kernels (~1e-6)
            assert torch.all((got - ref).abs() <= ref.abs() * 2.0**-11 + 2e-5), image_id

    bad_only = tmp_path / "bad_only"
    bad_only.mkdir()
    for name in BAD:
        (bad_only / name).write_bytes((root / name).read_bytes())
    nothing = subprocess.run(
        [sys.executable, str(ENCODE), str(bad_only), "--db", str(tmp_path / "db2"), *COMMON,
         "--address", ray_head["gcs"]],
        capture_output=True, text=True, timeout=300,
    )
    assert nothing.returncode == 1, nothing.stdout[-3000:] + nothing.stderr[-3000:]
    assert "nothing could be encoded" in nothing.stderr
    assert {e["image_id"]: e["reason"] for e in FeatureStore(str(tmp_path / "db2")).errors().to_pylist()} == BAD


# --- in-process pieces ----------------------------------------------------------------------------


def test_stages_match_predictor_encode_batch_bit_for_bit(tmp_path):
    images = {"a.png": _image(100, 120, 1), "b.png": _image(100, 120, 2), "c.png": _image(130, 60, 3)}
    for name, img in images.items():
        Image.fromarray(img).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"GIF89a")
    preprocess = PreprocessConfig(max_side=96)
    spec = EncoderSpec(variant="small", preprocess=preprocess, dtype="float32")
    batch = pa.table({"image_id": [*images, "bad.png"], "uri": [str(tmp_path / n) for n in [*images, "bad.png"]]})
    decoded = decode_stage(batch, preprocess)
    assert decoded.column("reason").to_pylist() == [None, None, None, "corrupt"]
    predictor = build_predictor(spec, device="cpu")
    stage = EncoderStage(spec, predictor.fingerprint)
    encoded = stage(decoded)
    want = predictor.encode_batch(list(images.values()))
    store = FeatureStore(str(tmp_path / "db"))
    results = write_stage(encoded, store.features_uri)
    assert store.count() == 0  # written, not committed
    store.commit_fragments([f for fr in results.column("fragments").to_pylist() for f in fr])
    reader = store.reader(predictor.fingerprint)
    for (name, _), ref in zip(images.items(), want):
        got = reader.get(name)
        assert got.geometry == ref.geometry and got.geometry.resized
        assert all(torch.equal(x, y) for x, y in zip(got.pyramid, ref.pyramid))
    assert results.column("reason").to_pylist() == [None, None, None, "corrupt"]


def test_resource_plan_leaves_cpus_for_read_tasks():
    two = plan_resources(2, 0)
    assert (two.num_encoders, two.cpus_per_encoder, two.gpus_per_encoder, two.threads_per_encoder) == (1, 1.0, 0.0, 1)
    assert two.cpus_per_task == 1.0
    big = plan_resources(16, 0)
    assert big.num_encoders * big.cpus_per_encoder == 12 and big.threads_per_encoder == 4
    gpu = plan_resources(32, 4)
    assert (gpu.num_encoders, gpu.gpus_per_encoder, gpu.cpus_per_encoder) == (4, 1.0, 1.0)
    tiny_gpu = plan_resources(2, 1)
    assert tiny_gpu.cpus_per_encoder == 1.0 and tiny_gpu.cpus_per_task == 1.0
    assert plan_resources(1, 0).cpus_per_encoder == 0.5
    with pytest.raises(ValueError, match="hang"):
        plan_resources(2, 0, num_encoders=2, cpus_per_encoder=1)
    with pytest.raises(ValueError, match="GPUs"):
        plan_resources(8, 1, num_encoders=2)


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, str(ENCODE), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for option in ("--image-root", "--coco-id", "--db", "--table", "--storage-option", "--checkpoint", "--variant",
                   "--seed", "--max-side", "--max-pixels", "--dtype", "--batch-size", "--write-batch",
                   "--num-encoders", "--cpus-per-encoder", "--address", "--num-cpus", "--commit-interval",
                   "--limit", "--retry-failed", "--summary-json", "--ray-progress"):
        assert option in out.stdout, option
    bad = subprocess.run([sys.executable, str(ENCODE), "x", "--storage-option", "novalue"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
