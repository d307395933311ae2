"""The encode job end to end: a real Ray head (`ray start --head`, no token authentication), `ray job submit`
as the README writes it, a real LanceDB folder, an image folder with bad files mixed in (including a dangling
link and a folder named like an image), runs stopped or killed at a moment chosen by an event, and re-run.
Plus the in-process pieces (stages, resource plan, --help, exit codes) without a cluster.

Faults land on events, never on time: the write stage holds (pipeline.faults "hold") from its second write on,
once some work is staged, the test stops or kills the driver there, then releases it."""
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
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest
import torch
from multinode_support import wait_for
from PIL import Image

from interformer.config import PreprocessConfig
from pipeline.encode_run import EncodeSummary, exit_code
from pipeline.encoding import EncoderSpec, EncoderStage, build_predictor, decode_stage, plan_resources, write_stage
from pipeline.faults import FAULT_DIR_ENV, FAULT_ENV
from pipeline.feature_store import FeatureStore
from pipeline.images import decode_image
from pipeline.staged_commits import StagedCommitter, read_staged

ROOT = Path(__file__).resolve().parents[1]
ENCODE = [sys.executable, "-m", "jobs.encode"]
MAX_PIXELS = 60_000
MAX_ENCODE_MEMORY = 0.001  # GiB: the small ViT's attention for the good images (<= 100 tokens), not 240x240's
BAD = {"broken.jpg": "truncated", "empty.png": "empty", "notes.png": "not_an_image", "huge.png": "too_large",
       "dangling.png": "unreadable", "folder.jpg": "unreadable", "wide.png": "too_large"}
COMMON = ["--variant", "small", "--max-pixels", str(MAX_PIXELS), "--max-encode-memory", str(MAX_ENCODE_MEMORY)]
FINGERPRINT = build_predictor(EncoderSpec(variant="small")).fingerprint


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
    """12 good images in nested folders (PNG and JPEG, three sizes) and seven kinds of bad input."""
    root = tmp_path_factory.mktemp("collection") / "images"
    good = []
    sizes = [(160, 160), (128, 192), (192, 128)]
    for n in range(12):
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
    Image.fromarray(_image(250, 250, 98)).save(root / "huge.png")  # 62,500 pixels > MAX_PIXELS
    Image.fromarray(_image(240, 240, 97)).save(root / "wide.png")  # 256 tokens: over MAX_ENCODE_MEMORY
    (root / "dangling.png").symlink_to(root / "deleted.png")
    (root / "folder.jpg").mkdir()
    return root, sorted(good)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", *args]


@pytest.fixture(scope="module")
def ray_head():
    """A private Ray head as a user starts one (`ray start --head` on a machine without a Ray token, so without
    token authentication) on 127.0.0.1, with
    2 CPUs, free ports and its own temp dir, for this module's tests only. `ray job stop` waits up to 120 s for
    the driver's last commit before it kills it (RAY_JOB_STOP_WAIT_TIME_S; Ray's default is 3 s)."""
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
    home = os.path.join(temp_dir, "home")  # a machine where no Ray token was ever made: no authentication
    os.makedirs(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_JOB_STOP_WAIT_TIME_S="120", PYTHONPATH=str(ROOT), HOME=home)
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"

    def up() -> bool:
        if head.poll() is not None:
            pytest.fail("the Ray head did not start:\n" + Path(log.name).read_text()[-3000:])
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    try:
        wait_for(up, "the Ray head's dashboard", timeout=180, poll=0.3)
        yield {"url": url, "gcs": f"127.0.0.1:{ports['port']}", "sid": head.pid}
    finally:
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


def _client_env() -> dict:
    """The environment of a user's shell: no RAY_AUTH_MODE (the cluster has no token authentication)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k not in ("RAY_ADDRESS", FAULT_ENV)}


def _submit(url: str, args: list[str], runtime_env: dict | None = None) -> str:
    """`ray job submit --no-wait --working-dir <repo> -- <this python> -m jobs.encode ...`, as the README says;
    returns the submission id. Retried until the head's job agent accepts it (it comes up after the dashboard)."""
    submission_id = f"encode-{uuid.uuid4().hex[:8]}"
    cmd = _ray_cli("job", "submit", "--address", url, "--working-dir", str(ROOT), "--entrypoint-num-cpus", "0",
                   "--submission-id", submission_id, "--no-wait")
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    cmd += ["--", *ENCODE, *args]

    def accepted() -> bool:
        out = subprocess.run(cmd, env=_client_env(), capture_output=True, text=True, timeout=300)
        if out.returncode == 0:
            return True
        assert "No available agent" in out.stderr, out.stderr[-3000:]
        return False

    wait_for(accepted, "the head's job agent", timeout=300, poll=2)
    return submission_id


def _job_status(url: str, submission_id: str) -> str | None:
    out = subprocess.run(_ray_cli("job", "status", "--address", url, submission_id), capture_output=True,
                         text=True, env=_client_env(), timeout=120)
    ended = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", out.stdout + out.stderr)
    return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[ended.group(1)] if ended else None


def _job_logs(url: str, submission_id: str) -> str:
    out = subprocess.run(_ray_cli("job", "logs", "--address", url, submission_id), capture_output=True, text=True,
                         env=_client_env(), timeout=120)
    return out.stdout


def _alive_pipeline_actors(url: str) -> list:
    """Ray Data's actors (its pools' MapWorkers) not yet dead; its stats actor lives on and is not counted."""
    out = subprocess.run(_ray_cli("list", "actors", "--address", url, "--filter", "state!=DEAD", "--format", "json"),
                         capture_output=True, text=True, env=_client_env(), timeout=120)
    if out.returncode == 0 and "No resource in the cluster" in out.stdout + out.stderr:
        return []
    if out.returncode != 0 or not out.stdout.strip().startswith("["):
        return [None]
    return [a for a in json.loads(out.stdout) if "MapWorker" in (a.get("class_name") or "")]


def _stored(db: Path) -> list[str]:
    """Image ids of the feature table for FINGERPRINT, one per row, read with lancedb itself."""
    table = lancedb.connect(str(db)).open_table("features").to_arrow()
    return sorted(i for i, f in zip(table.column("image_id").to_pylist(), table.column("fingerprint").to_pylist())
                  if f == FINGERPRINT)


def _errors(db: Path) -> dict[str, str]:
    table = lancedb.connect(str(db)).open_table("features_errors").to_arrow()
    return dict(zip(table.column("image_id").to_pylist(), table.column("reason").to_pylist()))


def _staged_ids(db: Path) -> set[str]:
    return {i for _, r in read_staged(str(db / "features_staged")) for f in r.fragments for i in f.image_ids}


def _hold_until_staged(faults: Path, db: Path, new_than: set[str], url: str, submission_id: str) -> set[str]:
    """Wait until a write task holds and some work not yet stored is staged; returns the staged ids."""
    try:
        wait_for(lambda: list(faults.glob("held-*")) and (_staged_ids(db) - new_than), "a write task to hold with "
                 "work staged", timeout=900)
    except AssertionError as e:
        raise AssertionError(f"{e}; the job says:\n{_job_logs(url, submission_id)[-4000:]}") from None
    return _staged_ids(db)


def _rearm(faults: Path) -> None:
    for f in faults.iterdir():
        f.unlink()


def _driver_pids(db: Path) -> list[int]:
    """The job's driver: this python running jobs.encode on this test's own table (Ray starts it in a session of
    its own)."""
    pids = subprocess.run(["pgrep", "-f", "jobs.encode"], capture_output=True, text=True)
    found = []
    for pid in map(int, pids.stdout.split()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if cmdline[:3] == ENCODE and str(db) in cmdline:
            found.append(pid)
    return found


@contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- end to end on a Ray cluster ------------------------------------------------------------------


@pytest.mark.slow
def test_submitted_job_stopped_then_killed_then_rerun_is_exactly_once_and_bit_exact(ray_head, collection, tmp_path):
    """Run 1 is stopped (`ray job stop`) while work is staged and no timer commit can have run: the stop commits
    all of it. Run 2's driver is killed (SIGKILL) with work staged: run 3 commits it (recovered) and finishes.
    Every good image is stored once, fp32 rows equal Predictor.encode bit for bit, every bad input is recorded."""
    root, good = collection
    db = tmp_path / "db"
    faults = tmp_path / "faults"
    faults.mkdir()
    summary_path = tmp_path / "summary.json"
    args = [str(root), "--db", str(db), *COMMON, "--dtype", "float32", "--batch-size", "1", "--write-batch", "1",
            "--commit-interval", "3600", "--summary-json", str(summary_path)]
    hold = {"env_vars": {FAULT_ENV: "written:hold:2", FAULT_DIR_ENV: str(faults)}}

    first = _submit(ray_head["url"], args, hold)
    staged = _hold_until_staged(faults, db, set(), ray_head["url"], first)
    assert _stored(db) == [], "nothing is committed before the timer fires or the job stops"
    stop = subprocess.run(_ray_cli("job", "stop", "--address", ray_head["url"], first), env=_client_env(),
                          capture_output=True, text=True, timeout=300)
    assert stop.returncode == 0, stop.stderr[-3000:]
    (faults / "release").touch()
    assert wait_for(lambda: _job_status(ray_head["url"], first), "run 1 to end", timeout=600, poll=1) == "STOPPED"
    after_stop = _stored(db)
    assert len(after_stop) == len(set(after_stop)), "duplicate rows after a stop"
    assert staged <= set(after_stop), "the stop did not commit work already written"
    assert "committing the fragments already written" in _job_logs(ray_head["url"], first)

    _rearm(faults)
    second = _submit(ray_head["url"], args, hold)
    _hold_until_staged(faults, db, set(after_stop), ray_head["url"], second)
    drivers = _driver_pids(db)
    assert drivers, "run 2's driver process not found"
    for pid in drivers:
        os.kill(pid, signal.SIGKILL)  # no chance to commit anything
    (faults / "release").touch()
    assert wait_for(lambda: _job_status(ray_head["url"], second), "run 2 to end", timeout=600, poll=1) == "FAILED"
    left = _staged_ids(db)
    assert left and not left & set(_stored(db)), "staged work of the killed driver is not committed yet"

    wait_for(lambda: not _alive_pipeline_actors(ray_head["url"]), "the killed job's actors to be gone", timeout=600,
             poll=2)
    third = subprocess.run([*ENCODE, *args, "--address", ray_head["gcs"]], cwd=ROOT, env=_client_env(),
                           capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "that an interrupted run had written" in third.stdout
    summary = json.loads(summary_path.read_text())
    assert summary["fingerprint"] == FINGERPRINT and summary["random_weights"]
    assert summary["recovered"] >= len(left)
    assert summary["recovered"] + summary["skipped"] + summary["encoded"] == len(good)
    assert summary["not_stored"] == len(BAD)
    assert _stored(db) == good, "each good image exactly once"
    assert _errors(db) == BAD
    assert read_staged(str(db / "features_staged")) == []

    store = FeatureStore(str(db))
    reader = store.reader(FINGERPRINT)
    predictor = build_predictor(EncoderSpec(variant="small"), device="cpu")
    with _torch_threads(1):  # as the job's 1-CPU actor
        for image_id in good[:4]:
            want = predictor.encode(decode_image((root / image_id).read_bytes()))
            rec = reader.get_record(image_id)
            assert rec.dtype == "float32" and rec.features.geometry == want.geometry
            assert rec.uri == str(root / image_id)
            assert rec.content_sha256 == hashlib.sha256((root / image_id).read_bytes()).hexdigest()
            for got, ref in zip(rec.features.pyramid, want.pyramid):
                assert torch.equal(got, ref), f"{image_id}: stored fp32 features differ from Predictor.encode"

    again = subprocess.run([*ENCODE, str(root), "--db", str(db), *COMMON, "--address", ray_head["gcs"]], cwd=ROOT,
                           env=_client_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]  # only unreadable inputs were left
    assert f"skipped      {len(good)}" in again.stdout and "known bad    5" in again.stdout
    assert "encoded      0 of 2 to do" in again.stdout  # the unreadable two are tried again, and fail again
    assert _stored(db) == good and _errors(db) == BAD


@pytest.mark.slow
def test_local_run_fp16_bad_only_strict_and_auth_mismatch(ray_head, collection, tmp_path):
    """`python -m jobs.encode DIR` with no cluster: a private local Ray, the table under ./lancedb, the encoder
    actors on OpenVINO (converted once into --engine-cache), fp16 rows within rounding of the torch
    Predictor.encode. A run with only bad files exits 0 (they are recorded), 1 with --strict.
    Token authentication asked for a cluster without it: exit 3 and a sentence, no traceback."""
    root, good = collection
    subset = tmp_path / "subset"
    for rel in good[:4]:
        (subset / rel).parent.mkdir(parents=True, exist_ok=True)
        (subset / rel).write_bytes((root / rel).read_bytes())
    engines = tmp_path / "engines"
    run = subprocess.run([*ENCODE, str(subset), *COMMON, "--batch-size", "2", "--num-cpus", "2",
                          "--encode-engine", "openvino", "--engine-cache", str(engines)],
                         cwd=tmp_path, env={**_client_env(), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "RANDOMLY INITIALISED" in run.stderr and "Started a local Ray" in run.stderr
    assert _stored(tmp_path / "lancedb") == good[:4]  # the default location, under the working directory
    assert len(list(engines.glob("*/encoder_v1_*.xml"))) == 1 and "fallback" not in run.stderr
    reader = FeatureStore(str(tmp_path / "lancedb")).reader(FINGERPRINT)
    predictor = build_predictor(EncoderSpec(variant="small"), device="cpu")
    with _torch_threads(1):
        for image_id in good[:4]:
            ref_pyramid = predictor.encode(decode_image((subset / image_id).read_bytes())).pyramid
            rec = reader.get_record(image_id)
            assert rec.dtype == "float16"
            for got, ref in zip(rec.features.pyramid, ref_pyramid):
                # half an fp16 ulp, plus the fp32 noise of batched kernels and of the runtime's (~1e-6)
                assert torch.all((got - ref).abs() <= ref.abs() * 2.0**-11 + 2e-5), image_id

    bad_only = tmp_path / "bad_only"
    shutil.copytree(root, bad_only, symlinks=True, ignore=lambda d, names: [n for n in names if n.startswith("set")])
    db2 = tmp_path / "db2"
    base = [*ENCODE, str(bad_only), "--db", str(db2), *COMMON, "--address", ray_head["gcs"]]
    nothing = subprocess.run(base, cwd=ROOT, env=_client_env(), capture_output=True, text=True, timeout=900)
    assert nothing.returncode == 0, nothing.stdout[-3000:] + nothing.stderr[-3000:]
    assert _errors(db2) == BAD and _stored(db2) == []
    strict = subprocess.run([*base, "--strict"], cwd=ROOT, env=_client_env(), capture_output=True, text=True,
                            timeout=900)
    assert strict.returncode == 1, strict.stdout[-3000:] + strict.stderr[-3000:]
    assert f"not stored   {len(BAD)} of {len(BAD)} listed" in strict.stdout

    home = tmp_path / "home"  # a user with no token file
    home.mkdir()
    token = subprocess.run(base, cwd=ROOT, env={**_client_env(), "HOME": str(home), "RAY_AUTH_MODE": "token"},
                           capture_output=True, text=True, timeout=900)
    assert token.returncode == 3, token.stdout[-3000:] + token.stderr[-3000:]
    assert "authentication failed" in token.stderr and "unset RAY_AUTH_MODE" in token.stderr
    assert "Traceback" not in token.stderr


def test_an_address_nothing_answers_at_is_exit_3_at_once_and_changes_nothing(tmp_path):
    """Ray would retry such an address for minutes: the job checks it first (loopback port with no listener)."""
    from pipeline.ray_runtime import RayConnectError, check_reachable

    port = _free_port()
    with pytest.raises(RayConnectError, match=f"cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers"):
        check_reachable(f"127.0.0.1:{port}")
    for bad in ("127.0.0.1:0", "127.0.0.1:99999", "127.0.0.1:x", ":6379"):
        with pytest.raises(RayConnectError, match="HOST:PORT"):
            check_reachable(bad)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_image(40, 56, 1)).save(folder / "a.png")
    run = subprocess.run([*ENCODE, str(folder), "--db", str(tmp_path / "db"), *COMMON, "--address",
                          f"127.0.0.1:{port}"], cwd=ROOT, env=_client_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 3 and "nothing answers" in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]


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
    committer = StagedCommitter(store)
    results = write_stage(encoded, store.features_uri, committer.uri, predictor.fingerprint)
    assert store.count() == 0  # written and staged, not committed
    assert committer.commit_staged() == 1
    reader = store.reader(predictor.fingerprint)
    for (name, _), ref in zip(images.items(), want):
        got = reader.get(name)
        assert got.geometry == ref.geometry and got.geometry.resized
        assert all(torch.equal(x, y) for x, y in zip(got.pyramid, ref.pyramid))
    assert results.column("reason").to_pylist() == [None, None, None, "corrupt"]
    assert {e["image_id"]: e["reason"] for e in store.errors().to_pylist()} == {"bad.png": "corrupt"}


def test_random_init_fingerprints_differ_by_seed():
    fingerprints = {build_predictor(EncoderSpec(variant="small", seed=s)).fingerprint for s in (0, 1, 0)}
    assert len(fingerprints) == 2 and all(":random-" in fp for fp in fingerprints)


def test_exit_code_contract():
    done = EncodeSummary(fingerprint="f", table="t", random_weights=True, listed=3, pending=1, not_stored=1)
    assert exit_code(done) == 0 and exit_code(done, strict=True) == 1
    assert exit_code(EncodeSummary("f", "t", True, listed=3), strict=True) == 0
    assert exit_code(EncodeSummary("f", "t", True, interrupted=True, not_stored=2)) == 130


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


def test_help_explains_every_option_and_the_exit_codes():
    out = subprocess.run([*ENCODE, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for option in ("--image-root", "--coco-id", "--db", "--table", "--storage-option", "--checkpoint", "--variant",
                   "--seed", "--max-side", "--max-pixels", "--dtype", "--precision", "--encode-engine",
                   "--engine-cache", "--batch-size", "--write-batch",
                   "--num-encoders", "--cpus-per-encoder", "--address", "--num-cpus", "--commit-interval",
                   "--limit", "--retry-failed", "--strict", "--summary-json", "--ray-progress"):
        assert option in out.stdout, option
    for code in ("0 ", "1 ", "2 ", "3 ", "130 "):
        assert f"\n  {code}" in out.stdout, code
    bad = subprocess.run([*ENCODE, "x", "--storage-option", "novalue"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


JOB_TIMEOUT = 600  # generous for a local Ray start and one small image on a loaded 2-core machine


def _unblock_fifo_readers(fifo: Path) -> None:
    """Let a reader blocked opening `fifo` go on (it then reads end-of-file): open it for writing, and close."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader is waiting
        pass


@pytest.mark.slow
def test_a_fifo_named_like_an_image_is_recorded_and_the_good_image_is_encoded(tmp_path):
    """The audit's case: a FIFO named x.png beside a good image hung the job for good (the decode task's open()
    waited for a writer, and the good image in its batch never got stored). Now the listing reports the FIFO
    from its directory entry: the good image is stored, the FIFO is an `unreadable` row of the errors table,
    and --strict exits 1. A subfolder that cannot be listed (its path is past PATH_MAX) is recorded the same
    way, where it used to vanish without a word."""
    from test_sources import unlistable_folder

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_image(40, 56, 1)).save(folder / "a.png")
    os.mkfifo(folder / "x.png")
    (folder / "sub").mkdir()
    deep_parent = unlistable_folder(folder / "sub")
    db, summary = tmp_path / "db", tmp_path / "summary.json"
    env = {**_client_env(), "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([*ENCODE, str(folder), "--db", str(db), *COMMON, "--num-cpus", "1", "--strict",
                            "--summary-json", str(summary)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        out, err = job.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        _unblock_fifo_readers(folder / "x.png")
        out, err = job.communicate(timeout=300)
        pytest.fail(f"the job hung on the FIFO for {JOB_TIMEOUT} s:\n{out[-2000:]}\n{err[-2000:]}")
    assert job.returncode == 1, out[-3000:] + err[-3000:]
    assert "Traceback" not in err
    assert _stored(db) == ["a.png"]
    errors = _errors(db)
    assert errors.pop("x.png") == "unreadable"
    ((folder_id, reason),) = errors.items()
    assert reason == "unreadable" and f"sub/{deep_parent}".startswith(folder_id)
    s = json.loads(summary.read_text())
    assert s["listed"] == 3 and s["not_stored"] == 2
    assert {f["image_id"] for f in s["failed"]} == {"x.png", folder_id}


# --- a --db / --table the job cannot use, and a storage failure in the middle --------------------------------------

def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _one_image(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_image(40, 56, 1)).save(folder / "a.png")
    return folder


def _garbage_manifest(db: Path) -> None:
    (db / "features.lance" / "_versions").mkdir(parents=True)
    (db / "features.lance" / "_versions" / "1.manifest").write_bytes(b"garbage")


def _file_not_folder(db: Path) -> None:
    db.mkdir()
    (db / "features.lance").write_bytes(b"junk")


def _foreign_features(db: Path) -> None:
    import lance

    lance.write_dataset(pa.table({"x": [1, 2]}), str(db / "features.lance"))


def _foreign_errors(db: Path) -> None:
    import lance

    lance.write_dataset(pa.table({"x": [1]}), str(db / "features_errors.lance"))


@pytest.mark.parametrize("damage,says", [
    (_garbage_manifest, "cannot be opened: LanceError(IO)"), (_file_not_folder, "cannot be opened: LanceError(IO)"),
    (_foreign_features, "another schema (missing columns"), (_foreign_errors, "another schema (missing columns"),
])
def test_a_db_the_job_cannot_use_is_one_error_line_exit_2_and_is_left_as_it_was(tmp_path, damage, says):
    db = tmp_path / "db"
    damage(db)
    before = _tree(db)
    run = subprocess.run([*ENCODE, str(_one_image(tmp_path)), "--db", str(db), *COMMON], cwd=ROOT, env=_client_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"error: table 'features{'_errors' if damage is _foreign_errors else ''}' under {db}" in run.stderr
    assert says in run.stderr and "Traceback" not in run.stderr and "Started a local Ray" not in run.stderr
    assert _tree(db) == before


def test_a_table_name_lancedb_refuses_is_an_option_error(tmp_path):
    run = subprocess.run([*ENCODE, str(_one_image(tmp_path)), "--db", str(tmp_path / "db"), "--table", "my table",
                          *COMMON], cwd=ROOT, env=_client_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--table: invalid table name 'my table'" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and not (tmp_path / "db").exists()


def _as_unprivileged(cmd: list[str], protected: Path) -> list[str]:
    """`cmd` run by a user who may read but not write `protected`: root bypasses file modes, so as root the folder
    is given to an unmapped uid and the command runs in a user namespace (skipped where that is not allowed)."""
    for path in [protected, *protected.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    if os.geteuid() != 0:
        return cmd
    unshare = ["unshare", "-U", "--map-user=1000", "--map-group=1000"]
    if shutil.which("unshare") is None or subprocess.run([*unshare, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without user namespaces: no way to be refused a write")
    for path in [protected, *protected.rglob("*")]:
        os.chown(path, 12345, 12345)
    return [*unshare, *cmd]


def test_a_db_that_is_not_writable_is_refused_before_anything_is_encoded(tmp_path):
    db = tmp_path / "db"
    FeatureStore(str(db))  # an existing table of ours, on storage this user may read but not write
    before = _tree(db)
    cmd = _as_unprivileged([*ENCODE, str(_one_image(tmp_path)), "--db", str(db), *COMMON], db)
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=_client_env(), capture_output=True, text=True, timeout=300)
    finally:
        for path in [db, *db.rglob("*")]:
            if os.geteuid() == 0:
                os.chown(path, 0, 0)
            path.chmod(path.stat().st_mode | 0o200)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"error: cannot write to the feature table {db / 'features.lance'}" in run.stderr
    assert "Traceback" not in run.stderr and "Started a local Ray" not in run.stderr and _tree(db) == before


@pytest.mark.slow
def test_a_storage_failure_in_the_pipeline_prints_what_was_committed_and_exits_1(tmp_path):
    """The 2nd fragment written fails as a full disk would (fault injection across processes): the run ends
    with its summary (what was committed), one error line and exit 1, no traceback; the rerun finishes the job,
    each image stored once."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in range(5):
        Image.fromarray(_image(40, 56, n)).save(folder / f"i{n}.png")
    faults = tmp_path / "faults"
    faults.mkdir()
    db, summary = tmp_path / "db", tmp_path / "summary.json"
    cmd = [*ENCODE, str(folder), "--db", str(db), *COMMON, "--num-cpus", "2", "--batch-size", "1", "--write-batch",
           "1", "--summary-json", str(summary), "--strict"]
    env = {**_client_env(), FAULT_ENV: "written:oserror:2", FAULT_DIR_ENV: str(faults)}
    failed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert s["error"].startswith("OSError: [Errno 28] No space left on device") and "encode summary" in failed.stdout
    assert "error: the run failed: OSError: [Errno 28]" in failed.stderr and "Traceback" not in failed.stderr
    assert s["encoded"] == len(_stored(db)) < 5 and s["not_stored"] == 5 - s["encoded"]
    again = subprocess.run(cmd, cwd=ROOT, env=_client_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert _stored(db) == sorted(f"i{n}.png" for n in range(5))
