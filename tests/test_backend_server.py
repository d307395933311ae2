"""Every endpoint of the ML backend through FastAPI's TestClient, with the real model and feature table.

The segmenter is the in-process engine (the same code the Ray actors run; the actor pool itself is
tested in test_backend_actors.py and end to end in test_label_studio_e2e.py).
"""
from __future__ import annotations

import asyncio
import base64
import json
import threading

import numpy as np
import pytest
from backend_support import (
    LABEL_CONFIG,
    encode_into_store,
    grabcut_images,
    keypoint,
    make_checkpoint,
    pixel,
    rectangle,
    reference_mask,
    write_png,
)
from fastapi.testclient import TestClient

from connectors.engine import EngineConfig, InProcessSegmenter
from connectors.protocol import ContextItem, parse_label_config, prompt_from_items
from connectors.rle import rle_to_mask
from connectors.segment import SegmentError
from connectors.server import ServerSettings, create_app
from pipeline.image_access import ImageAccess

SIZE = (64, 96)
MV = "interformer-small-test"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("backend")
    ckpt = make_checkpoint(tmp / "small.pth")
    images = grabcut_images(3, SIZE)
    paths = {name: write_png(img, tmp / "images" / f"{name}.png") for name, img in images}
    stored = [(f"img-{i}", str(paths[name]), img) for i, (name, img) in enumerate(images[:2])]
    encode_into_store(ckpt, tmp / "db", "features", stored)
    cfg = EngineConfig(db=str(tmp / "db"), table="features", checkpoint=str(ckpt), variant="small",
                       threads=2, access=ImageAccess(allowed_roots=(str((tmp / "images").resolve()),)))
    segmenter = InProcessSegmenter(cfg)
    return {"tmp": tmp, "ckpt": ckpt, "images": images, "paths": paths, "segmenter": segmenter, "cfg": cfg}


def ref(env, image_id: str, clicks, box=None) -> np.ndarray:
    return reference_mask(env["ckpt"], env["tmp"] / "db", "features", image_id, clicks, box)


def make_client(env, **settings) -> TestClient:
    return TestClient(create_app(ServerSettings(model_version=MV, **settings), env["segmenter"]))


@pytest.fixture(scope="module")
def client(env):
    with make_client(env) as c:
        yield c


def body(task_data: dict, context_items: list | None, label_config: str | None = LABEL_CONFIG, tasks=None) -> dict:
    b = {"tasks": tasks or [{"id": 7, "data": task_data, "annotations": [], "predictions": []}],
         "project": "3.1795474399", "params": {"login": None, "password": None,
                                               "context": None if context_items is None else {"result": context_items}}}
    if label_config is not None:
        b["label_config"] = label_config
    return b


def the_mask(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 1
    region = results[0]["result"][0]
    assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
    return rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])


class _HeldSegmenter:
    """A segmenter that holds every request until released: the model side is busy."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    async def segment(self, request):
        self.entered.set()
        await asyncio.to_thread(self.release.wait)
        raise SegmentError(503, "released")

    def ready(self) -> bool:
        return True


def test_health_and_setup_answer_while_every_actor_is_busy():
    held = _HeldSegmenter()
    with TestClient(create_app(ServerSettings(model_version=MV), held)) as c:
        busy = threading.Thread(target=lambda: c.post(
            "/predict", json=body({"image_id": "img-0"}, [keypoint(50, 50, SIZE)])))
        busy.start()
        try:
            assert held.entered.wait(timeout=120)
            r = c.get("/health")
            assert r.status_code == 200 and r.json()["status"] == "UP" and r.json()["model_version"] == MV
            assert c.post("/setup", json={"project": "1.2", "schema": LABEL_CONFIG}).json() == {"model_version": MV}
            assert busy.is_alive()  # the /predict is still held while both answered
        finally:
            held.release.set()
            busy.join()


def test_setup_returns_the_model_version_and_stores_the_config(env):
    with make_client(env) as c:
        r = c.post("/setup", json={"project": "9.1795474399", "schema": LABEL_CONFIG,
                                   "hostname": "http://localhost:8080", "access_token": "t", "extra_params": None})
        assert r.status_code == 200 and r.json() == {"model_version": MV}
        # later predictions of project 9 may omit the label config
        r = c.post("/predict", json={**body({"image_id": "img-0"}, [keypoint(50, 50, SIZE)], None),
                                     "project": "9.1795474399"})
        assert r.status_code == 200, r.text
        r = c.post("/predict", json={**body({"image_id": "img-0"}, [keypoint(50, 50, SIZE)], None),
                                     "project": "10.1"})
        assert r.status_code == 422 and "/setup was not called" in r.json()["error"]


def test_setup_with_a_config_lacking_brush_labels_is_refused(client):
    r = client.post("/setup", json={"project": "1.1", "schema": "<View><Image name='i' value='$i'/></View>"})
    assert r.status_code == 422 and "BrushLabels" in r.json()["error"]


def test_webhook_accepts_events(client):
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "project": {"id": 3}})
    assert r.status_code == 200


def test_interactive_clicks_return_the_models_mask(env, client):
    items = [keypoint(50, 50, SIZE, item_id="a")]
    clicks = [pixel(50, 50, SIZE)]
    r = client.post("/predict", json=body({"image_id": "img-0", "image": "ignored"}, items))
    np.testing.assert_array_equal(the_mask(r), ref(env, "img-0", clicks))
    result = r.json()["results"][0]
    assert result["model_version"] == MV and 0.5 <= result["score"] <= 1.0
    assert result["result"][0]["value"]["brushlabels"] == ["object"]
    assert (result["result"][0]["from_name"], result["result"][0]["to_name"]) == ("tag", "image")
    for n, (x, y, pos) in enumerate([(20, 20, False), (70, 40, True), (30, 80, False)], start=2):
        items.append(keypoint(x, y, SIZE, pos, item_id=f"k{n}"))
        clicks.append(pixel(x, y, SIZE, pos))
        r = client.post("/predict", json=body({"image_id": "img-0"}, items))
        np.testing.assert_array_equal(the_mask(r), ref(env, "img-0", clicks))


def test_the_image_url_is_looked_up_in_the_table_when_there_is_no_image_id(env, client):
    name = env["images"][1][0]
    r = client.post("/predict", json=body({"image": str(env["paths"][name])}, [keypoint(40, 60, SIZE)]))
    np.testing.assert_array_equal(the_mask(r), ref(env, "img-1", [pixel(40, 60, SIZE)]))


def test_a_box_prompt_gives_a_mask_inside_its_region(env, client):
    item = rectangle(30, 20, 40, 50, SIZE)
    prompt = prompt_from_items([ContextItem.model_validate(item)], parse_label_config(LABEL_CONFIG))
    mask = the_mask(client.post("/predict", json=body({"image_id": "img-0"}, [item])))
    np.testing.assert_array_equal(mask, ref(env, "img-0", list(prompt.clicks), box=prompt.box))
    left, up, right, bottom = prompt.box
    assert mask.any() and not mask[:, :left].any() and not mask[:, right:].any() and not mask[bottom:].any()


def test_negative_only_clicks_give_an_empty_prediction(client):
    r = client.post("/predict", json=body({"image_id": "img-0"}, [keypoint(50, 50, SIZE, False)]))
    assert r.status_code == 200
    assert r.json()["results"] == [{"result": [], "score": 0.0, "model_version": MV}]


def test_an_image_without_features_is_encoded_on_demand(env, client):
    path = str(env["paths"][env["images"][2][0]])
    r = client.post("/predict", json=body({"image": path}, [keypoint(50, 50, SIZE)]))
    np.testing.assert_array_equal(the_mask(r), ref(env, path, [pixel(50, 50, SIZE)]))
    from pipeline.feature_store import FeatureStore

    assert path in FeatureStore(env["cfg"].db, "features").existing_ids(env["segmenter"].engine.fingerprint)


@pytest.mark.parametrize("image, message", [
    ("/etc/passwd", "outside the allowed roots"),
    ("{root}/../../etc/hosts", "'..' segments"),
    ("http://example.com/cat.png", "neither the configured Label Studio server"),
    ("/data/upload/1/x.png", "LABEL_STUDIO_URL is not set"),
    ("ftp://host/x.png", "scheme 'ftp' is not one of"),
])
def test_unknown_images_that_cannot_be_fetched_get_a_clear_404(env, client, image, message):
    image = image.format(root=env["tmp"] / "images")
    r = client.post("/predict", json=body({"image": image}, [keypoint(50, 50, SIZE)]))
    assert r.status_code == 404 and message in r.json()["error"]


def test_an_unknown_image_id_without_a_url_is_a_clear_404(env, client):
    r = client.post("/predict", json=body({"image_id": "nope"}, [keypoint(50, 50, SIZE)]))
    assert r.status_code == 404
    error = r.json()["error"]
    assert "'nope' has no stored features" in error and "no image URL" in error
    assert env["cfg"].db not in error and env["segmenter"].engine.fingerprint not in error  # no server internals


def test_a_size_mismatch_with_the_stored_features_is_refused(client):
    r = client.post("/predict", json=body({"image_id": "img-0"}, [keypoint(50, 50, (65, 96))]))
    assert r.status_code == 422 and "but its features were computed at 96x64" in r.json()["error"]


@pytest.mark.parametrize("payload, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[1, 2]", 422, "JSON object"),
    (json.dumps({"tasks": []}).encode(), 422, "tasks"),
    (json.dumps(body({"image_id": "img-0"}, [])).encode(), 422, "no keypointlabels or rectanglelabels"),
    (json.dumps({**body({"image_id": "img-0"}, None), "params": {"context": {"result": [{"type": "keypointlabels"}]}}}
                ).encode(), 422, "original_width"),
    (json.dumps(body({"image_id": "img-0"}, [keypoint(50, 50, SIZE, label="dog")])).encode(), 422,
     "'dog' is not one of the BrushLabels"),
    (json.dumps(body({"image_id": "img-0"}, [keypoint(50, 50, SIZE)], label_config="<View>")).encode(), 422,
     "not valid XML"),
    (json.dumps(body({}, [keypoint(50, 50, SIZE)])).encode(), 422, "neither data.image_id nor data.image"),
    (json.dumps(body({"image_id": "img-0"}, [keypoint(50, 50, SIZE)],
                     tasks=[{"id": 1, "data": {"image_id": "img-0"}}, {"id": 2, "data": {"image_id": "img-1"}}])
                ).encode(), 422, "must carry one task"),
])
def test_malformed_requests_get_a_4xx_with_a_message(client, payload, status, message):
    r = client.post("/predict", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_oversized_bodies_are_refused_before_parsing(env):
    with make_client(env, max_body_bytes=2000) as c:
        big = body({"image_id": "img-0"}, [keypoint(50, 50, SIZE)])
        big["tasks"][0]["predictions"] = [{"result": [{"value": {"rle": list(range(2000))}}]}]
        r = c.post("/predict", json=big)
        assert r.status_code == 413 and "over the limit of 2000 bytes" in r.json()["error"]
        r = c.post("/predict", content=iter([b"{" + b" " * 3000 + b"}"]))  # chunked, no Content-Length
        assert r.status_code == 413


def test_batch_predictions_come_from_stored_keypoints_one_per_task(env, client):
    annotated = {"id": 1, "data": {"image_id": "img-1"}, "annotations": [
        {"id": 5, "updated_at": "2026-11-01", "result": [keypoint(40, 60, SIZE, item_id="p"),
                                                         keypoint(10, 10, SIZE, False, item_id="n")]}]}
    bare = {"id": 2, "data": {"image_id": "img-0"}, "annotations": []}
    broken = {"id": 3, "data": {"image_id": "img-0"}, "annotations": [
        {"id": 6, "result": [keypoint(40, 60, SIZE, label="dog")]}]}
    r = client.post("/predict", json=body({}, None, tasks=[annotated, bare, broken]))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    region = results[0]["result"][0]
    mask = rle_to_mask(region["value"]["rle"], *SIZE)
    np.testing.assert_array_equal(
        mask, ref(env, "img-1", [pixel(40, 60, SIZE), pixel(10, 10, SIZE, False)]))
    assert results[1]["result"] == [] and results[2]["result"] == []


def test_basic_auth(env):
    with make_client(env, basic_auth_user="ls", basic_auth_pass="s3cret") as c:
        assert c.get("/health").status_code == 401
        assert c.get("/health").headers["www-authenticate"].startswith("Basic")
        bad = base64.b64encode(b"ls:wrong").decode()
        assert c.get("/health", headers={"Authorization": f"Basic {bad}"}).status_code == 401
        assert c.get("/health", headers={"Authorization": "Basic %%%"}).status_code == 401
        assert c.post("/predict", json=body({"image_id": "img-0"}, [keypoint(50, 50, SIZE)])).status_code == 401
        assert c.post("/webhook", json={"action": "PROJECT_UPDATED"}).status_code == 200  # LS sends no auth here
        good = base64.b64encode(b"ls:s3cret").decode()
        assert c.get("/health", headers={"Authorization": f"Basic {good}"}).status_code == 200
        r = c.post("/predict", json=body({"image_id": "img-0"}, [keypoint(50, 50, SIZE)]),
                   headers={"Authorization": f"Basic {good}"})
        assert r.status_code == 200
    with pytest.raises(ValueError, match="password"):
        create_app(ServerSettings(model_version=MV, basic_auth_user="ls"), env["segmenter"])


def test_each_request_is_logged_with_its_timings(client, caplog):
    with caplog.at_level("INFO", logger="connectors"):
        client.post("/predict", json=body({"image_id": "img-1"}, [keypoint(33, 33, SIZE, item_id="logged")]))
        client.post("/predict", json=body({"image_id": "img-1"}, [keypoint(33, 33, SIZE, label="dog")]))
    records = [r.fields for r in caplog.records if r.getMessage() == "request"]
    ok, bad = records[-2], records[-1]
    assert ok["path"] == "/predict" and ok["status"] == 200 and ok["session"] == "replay"
    for key in ("total_ms", "parse_ms", "fetch_ms", "interact_ms", "rle_ms", "actor_total_ms"):
        assert isinstance(ok[key], float) and np.isfinite(ok[key])
    # the stages are nested: the request's total holds parsing and the actor's work, which holds the click step
    assert ok["total_ms"] + 0.02 >= ok["parse_ms"] + ok["actor_total_ms"]
    assert ok["actor_total_ms"] + 0.02 >= ok["interact_ms"] + ok["rle_ms"]
    assert ok["image_id"] == "img-1" and ok["clicks"] == 1
    assert bad["status"] == 422 and "'dog'" in bad["error"]


def test_timings_are_returned_in_server_timing(client):
    r = client.post("/predict", json=body({"image_id": "img-1"}, [keypoint(33, 33, SIZE, item_id="timed")]))
    parts = dict(p.split(";dur=") for p in r.headers["server-timing"].split(", "))
    assert {"parse", "fetch", "interact", "rle", "actor_total", "total"} <= set(parts)
    assert float(parts["total"]) + 0.02 >= float(parts["actor_total"]) + 0.02 >= float(parts["interact"])
    assert len(r.headers["x-request-id"]) == 12


class _BrokenSegmenter:
    """A segmenter whose model side fails with an unexpected error (e.g. a bug in a new checkpoint loader)."""

    async def segment(self, request):
        raise RuntimeError("weights went missing")

    def ready(self) -> bool:
        return False


def test_an_unexpected_failure_is_a_logged_500_and_the_server_keeps_serving(caplog):
    with TestClient(create_app(ServerSettings(model_version=MV), _BrokenSegmenter())) as c:
        with caplog.at_level("INFO", logger="connectors"):
            r = c.post("/predict", json=body({"image_id": "img-0"}, [keypoint(50, 50, SIZE)]))
        assert r.status_code == 500 and r.headers["x-request-id"] in r.json()["error"]
        assert "weights went missing" not in r.text  # the reason is for the operator's log, not the client
        assert any("weights went missing" in (rec.exc_text or "") or "weights went missing" in str(
            getattr(rec, "fields", {}).get("error", "")) for rec in caplog.records)
        assert c.get("/health").json()["actors_ready"] is False


# --------------------------------------------------------------------------------------------------
# Tasks of different projects never share features or sessions; odd task text and failures are 4xx/5xx
# with fixed messages, never a 500 with internals.


def _predict(client, data: dict, items: list, task_id: int = 7, project: str = "3.1795474399", annotations=()):
    b = body(data, items, tasks=[{"id": task_id, "data": data, "annotations": list(annotations), "predictions": []}])
    b["project"] = project  # sent as ASCII JSON, so that lone surrogates travel as \ud800 escapes
    return client.post("/predict", content=json.dumps(b), headers={"Content-Type": "application/json"})


def test_an_image_id_reused_by_another_project_for_another_picture_gets_that_pictures_features(env, client):
    """On-demand features are stored under the task's image reference, so an image_id chosen by one project
    can neither poison nor leak into a task of another project that reuses it for another picture."""
    img = env["images"][2][1]
    paths = [write_png(np.ascontiguousarray(img[::-1]), env["tmp"] / "images" / "reused-a.png"),
             write_png(np.ascontiguousarray(img[:, ::-1]), env["tmp"] / "images" / "reused-b.png")]
    clicks = [keypoint(40, 60, SIZE, item_id="reuse-1")]
    masks = [the_mask(_predict(client, {"image_id": "reused-id", "image": str(p)}, clicks, task_id=70 + i,
                               project=f"{70 + i}.1")) for i, p in enumerate(paths)]
    for mask, path in zip(masks, paths):
        np.testing.assert_array_equal(mask, ref(env, str(path), [pixel(40, 60, SIZE)]))
    assert not np.array_equal(masks[0], masks[1])
    again = _predict(client, {"image_id": "reused-id", "image": str(paths[0])}, clicks, task_id=70, project="70.1")
    np.testing.assert_array_equal(the_mask(again), masks[0])


def test_a_region_id_reused_by_another_task_does_not_get_its_start_mask(env, client):
    """Sessions are per (image, task, region): another project's task with the same region id starts blank."""
    from connectors.rle import mask_to_rle

    h, w = SIZE
    full = np.zeros(SIZE, bool)
    full[5:60, 5:90] = True
    brush = {"id": "m1", "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": w,
             "original_height": h, "value": {"format": "rle", "rle": mask_to_rle(full), "brushlabels": ["object"]}}
    data = {"image_id": "img-1"}
    click = [keypoint(50, 50, SIZE, item_id="leak-1")]
    with_start = the_mask(_predict(client, data, click, task_id=80, annotations=[{"id": 1, "result": [brush]}]))
    blank = the_mask(_predict(client, data, [keypoint(50, 50, SIZE, item_id="leak-fresh")], task_id=81,
                              project="81.1"))
    assert not np.array_equal(with_start, blank)
    other_task = the_mask(_predict(client, data, click, task_id=81, project="81.1"))
    np.testing.assert_array_equal(other_task, blank)


@pytest.mark.parametrize("data", [{"image_id": "\ud800"}, {"image_id": "x\udfff", "image": "/tmp/a.png"},
                                  {"image": "/tmp/\ud800.png"}, {"image": "file:///tmp/images/x%00.png"},
                                  {"image_id": "nul-1", "image": "file:///tmp/images/x%00.png"}])
def test_task_text_that_cannot_be_looked_up_is_a_4xx(client, data):
    r = _predict(client, data, [keypoint(50, 50, SIZE)])
    assert 400 <= r.status_code < 500 and r.json()["error"], r.text


def test_unexpected_failures_reading_or_encoding_features_get_a_fixed_message(env, client, monkeypatch, caplog):
    engine = env["segmenter"].engine

    def broken(*args):
        raise RuntimeError("/srv/secret/db pid=31337 ip=10.0.3.17")

    monkeypatch.setattr(engine, "encode_missing", broken)
    path = write_png(env["images"][2][1][::-1, ::-1].copy(), env["tmp"] / "images" / "broken-encoder.png")
    with caplog.at_level("ERROR", logger="connectors"):
        r = _predict(client, {"image": str(path)}, [keypoint(50, 50, SIZE)])
    assert r.status_code == 502 and "could not be encoded on demand" in r.json()["error"]
    assert "/srv/secret" not in r.text and "31337" not in r.text and "error id" in r.json()["error"]
    assert any("31337" in (rec.exc_text or "") for rec in caplog.records)  # the operator's log has it
    monkeypatch.setattr(engine.reader, "get_record", broken)  # what the engine reads (features + row identity)
    r = _predict(client, {"image_id": "not-cached-anywhere"}, [keypoint(50, 50, SIZE)])
    assert r.status_code == 500 and "stored features of the task's image could not be read" in r.json()["error"]
    assert "/srv/secret" not in r.text


@pytest.mark.parametrize("image_id, image_ref", [("\ud800", None), ("x\udfff", "/tmp/a.png"), (None, "/tmp/\ud800.png")])
def test_the_engine_refuses_task_text_lance_cannot_take(env, image_id, image_ref):
    """Whatever the server lets through, a lone surrogate never reaches the table as a 500."""
    from connectors.segment import SegmentRequest

    req = SegmentRequest(clicks=(pixel(50, 50, SIZE),), original_size=SIZE, image_id=image_id, image_ref=image_ref,
                         task_id=7, region_key="surrogate")
    with pytest.raises(SegmentError) as e:
        asyncio.run(env["segmenter"].segment(req))
    assert e.value.status == 422 and "not valid Unicode" in e.value.message


def test_a_size_that_is_the_stored_one_transposed_is_explained_as_an_exif_rotation():
    """Browsers apply a photo's EXIF orientation, the encoder does not: Label Studio then sizes a portrait photo
    as its stored grid turned by 90 degrees, and the refusal says what to do about it."""
    from connectors.engine import size_mismatch

    rotated = size_mismatch("img", (640, 480), (480, 640))
    assert "EXIF orientation" in rotated and "re-encode" in rotated
    other = size_mismatch("img", (600, 480), (480, 640))
    assert "another file" in other and "EXIF" not in other
