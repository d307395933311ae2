"""End to end against a real Label Studio 1.23.2 server (its own venv, .ls-venv).

Label Studio is the session's server (the `label_studio` fixture, tests/ls_server.py). Images are encoded
by jobs/encode.py; our backend is started with `python -m connectors` (local Ray, basic auth); Label
Studio is told about it through its API and sends the interactive requests itself
(ml.predict_interactive). The brush masks it hands back must decode to the mask our model gives
in-process for the same clicks. Also covered: a task whose image has no features (fetched from Label
Studio's local-files storage and encoded on demand), the batch path (retrieve_tasks_predictions on
stored keypoints) and the webhook Label Studio registers. The backend started here is stopped here.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from backend_support import (
    LABEL_CONFIG,
    ROOT,
    grabcut_images,
    keypoint,
    make_checkpoint,
    pixel,
    rectangle,
    reference_mask,
    write_png,
)

from connectors.region_meta import parse_click_meta
from connectors.rle import rle_to_mask
from pipeline.polygons import mask_to_polygons

pytestmark = pytest.mark.slow

SIZE = (64, 96)
AUTH = ("ls-backend", "pw-" + secrets.token_hex(8))


class BackendLog:
    """The backend's log as JSON records, read incrementally: one way to wait for a line.

    `wait_for` returns the first record (since the start of the log) that satisfies the predicate, as soon
    as it is written. The deadline only bounds a failure, never a pass: a missing line fails with the log's
    tail, and so does a backend that exited.
    """

    def __init__(self, path: Path, proc: subprocess.Popen):
        self.path, self.proc = path, proc
        self.records: list[dict] = []
        self._offset, self._partial = 0, b""

    def _read_new(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            start = line.find("{")  # Ray prefixes forwarded actor lines with "(Actor pid=...)"
            if start < 0:
                continue
            try:
                record = json.loads(line[start:])
            except ValueError:
                continue
            if isinstance(record, dict):
                self.records.append(record)

    def wait_for(self, predicate, what: str, timeout_s: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            self._read_new()
            for record in self.records[seen:]:
                if predicate(record):
                    return record
            seen = len(self.records)
            if self.proc.poll() is not None:
                pytest.fail(f"the backend exited ({self.proc.returncode}) before logging {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the backend never logged {what}:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self) -> str:
        return self.path.read_text(errors="replace")[-4000:]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, auth=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url} exited with {proc.returncode} before answering:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=1.0, auth=auth).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout_s} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def stack(label_studio, tmp_path_factory):
    """Images in Label Studio's local files, the first two encoded by jobs/encode.py, and our backend."""
    tmp = tmp_path_factory.mktemp("ls_e2e")
    storage = label_studio.files_root / f"backend-e2e-{secrets.token_hex(4)}"  # a Local Storage of the project
    images = grabcut_images(3, SIZE)
    for name, img in images[:2]:
        write_png(img, storage / "encoded" / f"{name}.png")
    write_png(images[2][1], storage / "new" / f"{images[2][0]}.png")  # never encoded: on demand via LS
    ckpt = make_checkpoint(tmp / "small.pth")
    logs = {"backend": tmp / "backend.log", "encode": tmp / "encode.log"}
    with open(logs["encode"], "w") as out:
        done = subprocess.run([sys.executable, str(ROOT / "jobs" / "encode.py"), str(storage / "encoded"),
                               "--db", str(tmp / "db"), "--checkpoint", str(ckpt), "--num-cpus", "2"],
                              cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    assert done.returncode == 0, logs["encode"].read_text()[-4000:]
    env = {**os.environ, **label_studio.env(), "ML_BACKEND_BASIC_AUTH_PASS": AUTH[1]}
    with open(logs["backend"], "w") as out:  # --port 0: the backend binds a free port and logs it
        backend = subprocess.Popen(
            [sys.executable, "-m", "connectors", "--db", str(tmp / "db"), "--checkpoint", str(ckpt),
             "--host", "127.0.0.1", "--port", "0", "--actors", "1", "--ray-cpus", "2", "--basic-auth-user", AUTH[0],
             "--encode-engine", "openvino", "--engine-cache", str(tmp / "engine-cache")],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        serving = BackendLog(logs["backend"], backend).wait_for(lambda r: r.get("msg") == "serving", "serving", 600)
        host, _, port = serving["url"].removeprefix("http://").rpartition(":")
        assert host == "127.0.0.1" and 0 < int(port) < 65536, serving
        wait_http(f"http://127.0.0.1:{port}/health", backend, logs["backend"], 600, auth=AUTH)
        yield {"tmp": tmp, "storage": storage, "images": images, "ckpt": ckpt, "logs": logs,
               "log": BackendLog(logs["backend"], backend), "ls": label_studio,
               "backend_url": f"http://127.0.0.1:{port}"}
    finally:
        if backend.poll() is None:
            backend.send_signal(signal.SIGINT)  # uvicorn stops, then the CLI shuts its Ray down
            try:
                backend.wait(timeout=60)
            except subprocess.TimeoutExpired:
                backend.kill()
                backend.wait(timeout=10)


@pytest.fixture(scope="module")
def project(stack):
    client = stack["ls"].client()
    p = client.projects.create(title="InterFormer e2e", label_config=LABEL_CONFIG)
    client.import_storage.local.create(project=p.id, path=str(stack["storage"]), title="files", use_blob_urls=True)
    names = [n for n, _ in stack["images"]]
    url = f"/data/local-files/?d={stack['storage'].name}/{{}}/{{}}.png"
    tasks = [{"data": {"image": url.format("encoded", names[0]), "image_id": f"{names[0]}.png"}},
             {"data": {"image": url.format("encoded", names[1]), "image_id": f"{names[1]}.png"}},
             {"data": {"image": url.format("new", names[2])}}]
    ids = client.projects.import_tasks(id=p.id, request=tasks, return_task_ids=True).task_ids
    ml = client.ml.create(project=p.id, url=stack["backend_url"], title="InterFormer", is_interactive=True,
                          auth_method="BASIC_AUTH", basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    return {"client": client, "project": p, "task_ids": ids, "ml": ml, "tasks": tasks}


def interactive(project, task_index: int, items: list[dict]) -> dict:
    raw = project["client"].ml.with_raw_response.predict_interactive(
        id=project["ml"].id, task=project["task_ids"][task_index], context={"result": items})
    body = raw.response.json()
    assert "errors" not in body, body
    return body["data"]


def decode(prediction: dict) -> np.ndarray:
    (region,) = prediction["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["object"]
    return rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])


def test_backend_is_connected(project):
    ml = project["client"].ml.get(id=project["ml"].id)
    assert ml.state == "CO", ml
    assert ml.model_version.startswith("interformer-small-small-")


def test_interactive_clicks_through_label_studio_give_the_models_masks(stack, project):
    image_id = f"{stack['images'][0][0]}.png"
    items, clicks = [], []
    for n, (x, y, positive) in enumerate([(50, 50, True), (15, 20, False), (75, 60, True)]):
        items.append(keypoint(x, y, SIZE, positive, item_id=f"e2e{n}"))
        clicks.append(pixel(x, y, SIZE, positive))
        prediction = interactive(project, 0, items)
        expected = reference_mask(stack["ckpt"], stack["tmp"] / "db", "features", image_id, clicks)
        assert 0 < expected.sum() < expected.size
        np.testing.assert_array_equal(decode(prediction), expected)
        assert prediction["model_version"] == project["ml"].model_version


def test_an_image_without_features_is_fetched_from_label_studio_and_encoded(stack, project):
    prediction = interactive(project, 2, [keypoint(40, 40, SIZE, item_id="new")])
    uri = project["tasks"][2]["data"]["image"]
    expected = reference_mask(stack["ckpt"], stack["tmp"] / "db", "features", uri, [pixel(40, 40, SIZE)])
    np.testing.assert_array_equal(decode(prediction), expected)
    log = stack["log"]
    request = log.wait_for(lambda r: r.get("encoded_on_demand") is True, "a request line with encoded_on_demand")
    assert request["status"] == 200
    # The encoder actor's own line reaches the backend's log through Ray's log forwarding, a moment later.
    event = log.wait_for(lambda r: r.get("msg") == "encoded on demand", "the encoder actor's 'encoded on demand' line")
    assert event["image_id"] == request["image_id"]  # the encoded image is the one the request asked for
    # --encode-engine openvino: the encoder actor converted the encoder at start, into --engine-cache, and ran it
    ready = log.wait_for(lambda r: r.get("msg") == "on-demand encoder ready", "the encoder actor's ready line")
    assert ready["encoder"] == "openvino-f32"
    assert list((stack["tmp"] / "engine-cache").rglob("encoder_v1_*.sha256"))


def test_errors_reach_label_studio_instead_of_masks(project):
    raw = project["client"].ml.with_raw_response.predict_interactive(
        id=project["ml"].id, task=project["task_ids"][1], context={"result": [keypoint(50, 50, SIZE, label="dog")]})
    assert "errors" in raw.response.json()


def test_batch_predictions_from_stored_keypoints_and_the_webhook(stack, project):
    client, tid = project["client"], project["task_ids"][1]
    items = [keypoint(40, 50, SIZE, item_id="s1"), keypoint(80, 20, SIZE, False, item_id="s2")]
    client.annotations.create(id=tid, result=items)
    client.actions.create(id="retrieve_tasks_predictions", project=project["project"].id,
                          selected_items={"all": False, "included": [tid]})
    preds = [p for p in client.predictions.list(task=tid) if p.model_version == project["ml"].model_version]
    assert preds, "Label Studio stored no prediction from the backend"
    expected = reference_mask(stack["ckpt"], stack["tmp"] / "db", "features", f"{stack['images'][1][0]}.png",
                              [pixel(40, 50, SIZE), pixel(80, 20, SIZE, False)])
    np.testing.assert_array_equal(decode({"result": [dict(r) for r in preds[-1].result]}), expected)
    # Label Studio may deliver its webhook after the API call returns: wait for the line, do not read once.
    hook = stack["log"].wait_for(lambda r: r.get("path") == "/webhook" and r.get("action") == "ANNOTATION_CREATED",
                                 "the ANNOTATION_CREATED webhook")
    assert hook["status"] == 200


def preannotate(stack, project_id: int, run: str) -> None:
    """jobs/preannotate.py --push on a project, as a user runs it (its own process, Label Studio's env)."""
    env = {**os.environ, **stack["ls"].env()}
    log = stack["tmp"] / f"{run}.log"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, str(ROOT / "jobs" / "preannotate.py"), "--ls-project",
                               str(project_id), "--push", "--db", str(stack["tmp"] / "db"), "--checkpoint",
                               str(stack["ckpt"]), "--workers", "0", "--run-dir", str(stack["tmp"] / run)],
                              cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    assert done.returncode == 0, log.read_text()[-4000:]


def test_a_click_on_a_pre_annotated_object_refines_the_prediction(stack, project):
    """Pre-annotate a task with jobs/preannotate.py --push (a box drawn in Label Studio), then click on that
    object through Label Studio: the answer is the API's initial_mask session on the prediction's mask."""
    client, name = project["client"], stack["images"][0][0]
    image_id = f"{name}.png"
    p = client.projects.create(title="refine e2e", label_config=LABEL_CONFIG)
    (tid,) = client.projects.import_tasks(id=p.id, return_task_ids=True, request=[{"data": {
        "image": f"/data/local-files/?d={stack['storage'].name}/encoded/{image_id}", "image_id": image_id}}]).task_ids
    client.annotations.create(id=tid, result=[rectangle(20, 15, 55, 70, SIZE, item_id="box")])
    preannotate(stack, p.id, "refine-run")
    (pred,) = list(client.predictions.list(task=tid))
    prior = decode({"result": [dict(r) for r in pred.result]})
    assert 0 < prior.sum() < prior.size
    assert "meta" not in dict(pred.result[0])  # a box prompt's region bounds its mask: no clicks to replay
    ml = client.ml.create(project=p.id, url=stack["backend_url"], title="InterFormer", is_interactive=True,
                          auth_method="BASIC_AUTH", basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    inside = np.argwhere(prior)
    row, col = inside[len(inside) // 2]
    x, y = (col + 0.5) * 100.0 / SIZE[1], (row + 0.5) * 100.0 / SIZE[0]
    clicks, items = [pixel(x, y, SIZE)], [keypoint(x, y, SIZE, item_id="fix1")]
    raw = client.ml.with_raw_response.predict_interactive(id=ml.id, task=tid, context={"result": items})
    answer = decode(raw.response.json()["data"])
    db = stack["tmp"] / "db"
    refined = reference_mask(stack["ckpt"], db, "features", image_id, clicks, initial_mask=prior)
    np.testing.assert_array_equal(answer, refined)
    assert not np.array_equal(answer, reference_mask(stack["ckpt"], db, "features", image_id, clicks))
    stack["log"].wait_for(lambda r: r.get("start") == f"prediction:{pred.id}", f"a session started from prediction {pred.id}")


def test_a_click_on_an_object_pre_annotated_from_points_continues_its_clicks(stack, project):
    """Keypoints drawn in Label Studio -> jobs/preannotate.py --push: the prediction's region keeps, through
    Label Studio's import and its /predict body, the clicks that made it (region meta); a click on the object
    through Label Studio answers what one session making those clicks and then this one answers."""
    client, name = project["client"], stack["images"][0][0]
    image_id = f"{name}.png"
    p = client.projects.create(title="refine clicks e2e", label_config=LABEL_CONFIG)
    (tid,) = client.projects.import_tasks(id=p.id, return_task_ids=True, request=[{"data": {
        "image": f"/data/local-files/?d={stack['storage'].name}/encoded/{image_id}", "image_id": image_id}}]).task_ids
    prompts = [keypoint(45, 50, SIZE, item_id="p1"), keypoint(10, 10, SIZE, positive=False, item_id="p2")]
    client.annotations.create(id=tid, result=prompts)
    preannotate(stack, p.id, "refine-clicks-run")
    (pred,) = list(client.predictions.list(task=tid))
    stored = parse_click_meta(dict(pred.result[0]).get("meta"), SIZE)
    assert stored is not None and list(stored.clicks) == [pixel(45, 50, SIZE), pixel(10, 10, SIZE, False)]
    prior = decode({"result": [dict(r) for r in pred.result]})
    db = stack["tmp"] / "db"
    np.testing.assert_array_equal(prior, reference_mask(stack["ckpt"], db, "features", image_id, list(stored.clicks)))
    ml = client.ml.create(project=p.id, url=stack["backend_url"], title="InterFormer", is_interactive=True,
                          auth_method="BASIC_AUTH", basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    inside = np.argwhere(prior)
    row, col = inside[len(inside) // 3]
    x, y = (col + 0.5) * 100.0 / SIZE[1], (row + 0.5) * 100.0 / SIZE[0]
    clicks = [pixel(x, y, SIZE)]
    raw = client.ml.with_raw_response.predict_interactive(id=ml.id, task=tid,
                                                          context={"result": [keypoint(x, y, SIZE, item_id="fix")]})
    answer = decode(raw.response.json()["data"])
    np.testing.assert_array_equal(answer, reference_mask(stack["ckpt"], db, "features", image_id, clicks,
                                                         initial_clicks=list(stored.clicks)))
    assert not np.array_equal(answer, reference_mask(stack["ckpt"], db, "features", image_id, clicks,
                                                     initial_mask=prior))
    stack["log"].wait_for(lambda r: r.get("start") == f"prediction:{pred.id}" and r.get("start_kind") == "clicks",
                          f"a session continuing prediction {pred.id}'s clicks")


POLYGON_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <PolygonLabels name="poly" toName="image"><Label value="object" background="#00FF00"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="object" smart="true"/></KeyPointLabels>
</View>"""


def test_a_polygon_project_gets_polygons_through_label_studio(stack, project):
    client, image_id = project["client"], f"{stack['images'][1][0]}.png"
    p = client.projects.create(title="polygon e2e", label_config=POLYGON_CONFIG)
    (tid,) = client.projects.import_tasks(id=p.id, return_task_ids=True, request=[{"data": {
        "image": f"/data/local-files/?d={stack['storage'].name}/encoded/{image_id}", "image_id": image_id}}]).task_ids
    ml = client.ml.create(project=p.id, url=stack["backend_url"], title="InterFormer", is_interactive=True,
                          auth_method="BASIC_AUTH", basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    raw = client.ml.with_raw_response.predict_interactive(id=ml.id, task=tid,
                                                          context={"result": [keypoint(50, 50, SIZE, item_id="pg")]})
    regions = raw.response.json()["data"]["result"]
    mask = reference_mask(stack["ckpt"], stack["tmp"] / "db", "features", image_id, [pixel(50, 50, SIZE)])
    assert regions and all(r["type"] == "polygonlabels" and r["value"]["polygonlabels"] == ["object"] for r in regions)
    assert [r["value"]["points"] for r in regions] == mask_to_polygons(mask).label_studio_points()
