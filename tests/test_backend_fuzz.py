"""Property-based fuzzing of the real backend app: request schema, image URLs and raw bodies.

The app is the FastAPI server with the real model and a real feature table (as test_backend_server.py
builds it). Two stub servers on 127.0.0.1 play Label Studio (serving one image and an /etc/passwd-like
file) and a host the backend must never reach. Every socket connect in this process is recorded, and
name resolution answers only loopback names and faked private/metadata names (nothing leaves the
machine). For every fuzzed request:

- the answer is never a 5xx, and a 4xx carries {"error": "..."};
- the forbidden host gets no request, and no connection goes anywhere but the Label Studio stub;
- no response carries file content (canary bytes planted in every readable non-image file), the
  feature table's path or the encoder fingerprint.

The number of requests sent is printed at the end of the module (pytest -s) and checked to be > 600.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from backend_support import LABEL_CONFIG, encode_into_store, grabcut_images, make_checkpoint, write_png
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from http_stub import Route, StubServer, guard_network

from connectors.engine import EngineConfig, InProcessSegmenter
from connectors.server import ServerSettings, create_app
from pipeline.image_access import ImageAccess

SIZE = (64, 96)
CANARY = "CANARY-7f3a9"
SECRET = f"root:x:0:0:{CANARY}:/root:/bin/bash\n".encode()
FAKE_DNS = {"metadata.test": "169.254.169.254", "private.test": "10.1.2.3", "mapped.test": "::ffff:10.0.0.1"}
FUZZ = settings(max_examples=160, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SENT: list[int] = []  # the status of every fuzzed request, in order


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    ckpt = make_checkpoint(tmp / "small.pth")
    images = grabcut_images(2, SIZE)
    root = tmp / "images"
    write_png(images[1][1], root / "new.png")
    (root / "canary.png").write_bytes(SECRET)  # inside the root, but not an image
    (tmp / "secret.txt").write_bytes(SECRET)  # outside the root
    os.symlink(tmp / "secret.txt", root / "escape.png")
    encode_into_store(ckpt, tmp / "db", "features", [("img-0", "stored", images[0][1])])
    png = (root / "new.png").read_bytes()
    forbidden = StubServer({"/x.png": Route(body=png), "/data/upload/1/x.png": Route(body=png)})
    ls = StubServer()
    with forbidden, ls, pytest.MonkeyPatch.context() as mp:
        ls.routes.update({
            "/data/upload/1/x.png": Route(body=png),
            "/data/upload/1/passwd.png": Route(body=SECRET),
            "/data/upload/1/redirect.png": Route(302, headers={"Location": f"{forbidden.url}/x.png"}),
            "/data/upload/1/meta.png": Route(302, headers={"Location": "http://metadata.test/latest/meta-data/"}),
        })
        connects = guard_network(mp, FAKE_DNS)["connects"]
        access = ImageAccess(label_studio_url=ls.url, api_key="k", allowed_roots=(str(root),),
                             storage_hosts=("metadata.test", "private.test", "mapped.test"),
                             max_image_bytes=1 << 20)
        cfg = EngineConfig(db=str(tmp / "db"), table="features", checkpoint=str(ckpt), variant="small", threads=1,
                           access=access)
        segmenter = InProcessSegmenter(cfg)
        app = create_app(ServerSettings(model_version="mv", max_body_bytes=1 << 20), segmenter)
        with TestClient(app, raise_server_exceptions=False) as client:
            yield {"client": client, "ls": ls, "forbidden": forbidden, "root": root, "tmp": tmp, "connects": connects,
                   "fingerprint": segmenter.engine.fingerprint, "db": cfg.db}
    print(f"\nfuzzed {len(SENT)} requests against the backend app; answers by status: "
          f"{dict(sorted(Counter(SENT).items()))}; requests reaching the Label Studio stub: {len(ls.hits)}")


def check(world, response) -> None:
    SENT.append(response.status_code)
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        assert isinstance(response.json().get("error"), str)
    text = response.text
    assert CANARY not in text and "root:x:0" not in text
    assert world["db"] not in text and world["fingerprint"] not in text
    assert world["forbidden"].hits == []
    assert set(world["connects"]) <= {("127.0.0.1", world["ls"].port)}, world["connects"]


def fuzzed(run) -> Counter:
    """Run a hypothesis property; the statuses of the requests it sent, after checking it sent enough. Each
    property checks its own count, so the suite proves the same in any order."""
    start = len(SENT)
    run()
    statuses = Counter(SENT[start:])
    assert sum(statuses.values()) >= 100, statuses
    return statuses


def keypoint(x=50.0, y=50.0, **over):
    item = {"original_width": SIZE[1], "original_height": SIZE[0], "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["object"]}, "is_positive": True,
            "id": "k1", "from_name": "kp", "to_name": "image", "type": "keypointlabels"}
    item.update(over)
    return item


def predict_body(data, items):
    return {"tasks": [{"id": 7, "data": data}], "project": "3.1", "label_config": LABEL_CONFIG,
            "params": {"context": {"result": items}}}


# --------------------------------------------------------------------------------------------------
# Strategies


def image_refs(world) -> st.SearchStrategy[str]:
    ls, fp, root = world["ls"].port, world["forbidden"].port, str(world["root"])
    hosts = ["127.0.0.1", "localhost", "127.1", "2130706433", "0x7f.0.0.1", "[::1]", "[::ffff:127.0.0.1]",
             "metadata.test", "private.test", "mapped.test", "169.254.169.254", "LOCALHOST", "127.0.0.1.", ""]
    userinfo = ["", "user@", f"127.0.0.1:{fp}@", f"127.0.0.1:{fp}\\@", "a:b@", "%40@", "@"]
    ports = [f":{ls}", f":{fp}", "", ":0", f":0{ls}", ":65536", ":", f":{ls}:{fp}"]
    seps = ["/", "\\", "?", "#", "%2f", "//", "/\\", "\t/", "\n/"]
    paths = ["data/upload/1/x.png", "data/upload/1/passwd.png", "data/upload/1/redirect.png",
             "data/upload/1/meta.png", "data/local-files/?d=../../etc/passwd", "data/local-files/?d=%2e%2e/x",
             "x.png", "latest/meta-data/", "api/projects"]
    schemes = ["http", "https", "HTTP", "hTtP", "ftp", "gopher", "file", "s3", "jar:http", ""]
    url = st.builds(lambda s, u, h, p, sep, path: f"{s}://{u}{h}{p}{sep}{path}", st.sampled_from(schemes),
                    st.sampled_from(userinfo), st.sampled_from(hosts), st.sampled_from(ports),
                    st.sampled_from(seps), st.sampled_from(paths))
    parts = ["", root, "/", "..", "%2e%2e", "canary.png", "escape.png", "new.png", "secret.txt", "images", ".",
             "/etc/passwd", "\x00", "data", "upload", "1", "passwd.png", "local-files", "?d=", "file://",
             "file://localhost", "storage-data"]
    paths_ = st.lists(st.sampled_from(parts), min_size=1, max_size=6).map("/".join)
    fixed = st.sampled_from([f"{root}/canary.png", f"{root}/escape.png", f"{root}/../secret.txt",
                             f"file://{root}/escape.png", f"file://{root}/canary.png", "/data/upload/1/passwd.png",
                             "/data/upload/1/redirect.png", "/data/upload/1/meta.png", "upload/1/passwd.png",
                             f"http://127.0.0.1:{fp}\\@127.0.0.1:{ls}/data/upload/1/x.png",
                             "/data/local-files/?d=../../../../etc/passwd", "s3://bucket/../../x.png"])
    return st.one_of(fixed, url, paths_, st.text(max_size=80))


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                      st.characters(categories=["Cs"]))
JSON = st.recursive(JSON_LEAF, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                    max_leaves=12)


def mutated(body: dict, draw_paths: list[tuple[list, object]]) -> dict:
    """`body` with the value at each key path replaced (or added)."""
    body = json.loads(json.dumps(body))
    for path, value in draw_paths:
        node = body
        for key in path[:-1]:
            node = node[key] if isinstance(node, dict) and key in node else (
                node[key] if isinstance(node, list) and isinstance(key, int) and key < len(node) else None)
            if node is None:
                break
        else:
            last = path[-1]
            if isinstance(node, dict) or (isinstance(node, list) and isinstance(last, int) and last < len(node)):
                node[last] = value
    return body


FIELD_PATHS = [["tasks"], ["tasks", 0], ["tasks", 0, "id"], ["tasks", 0, "data"], ["tasks", 0, "data", "image_id"],
               ["tasks", 0, "data", "image"], ["tasks", 0, "annotations"], ["project"], ["label_config"],
               ["params"], ["params", "context"], ["params", "context", "result"],
               ["params", "context", "result", 0], ["params", "context", "result", 0, "value"],
               ["params", "context", "result", 0, "value", "x"], ["params", "context", "result", 0, "value", "y"],
               ["params", "context", "result", 0, "value", "rotation"], ["params", "context", "result", 0, "type"],
               ["params", "context", "result", 0, "original_width"], ["params", "context", "result", 0, "is_positive"],
               ["params", "context", "result", 0, "image_rotation"], ["params", "context", "result", 0, "to_name"],
               ["params", "context", "result", 0, "value", "keypointlabels"]]


def post(world, path, payload):
    content = payload if isinstance(payload, (bytes, str)) else json.dumps(payload).encode()
    return world["client"].post(path, content=content, headers={"content-type": "application/json"})


# --------------------------------------------------------------------------------------------------
# Properties


def test_image_references_never_reach_outside_the_allowed_sources(world):
    @FUZZ
    @given(ref=image_refs(world), image_id=st.one_of(st.none(), st.text(max_size=12), st.characters(categories=["Cs"])),
           rect=st.booleans())
    @example(ref=f"{world['ls'].url}/data/upload/1/x.png", image_id=None, rect=False)  # served: not all refused
    def run(ref, image_id, rect):
        data = {"image": ref} if image_id is None else {"image": ref, "image_id": image_id}
        item = keypoint() if not rect else {**keypoint(), "type": "rectanglelabels", "from_name": "box",
                                            "value": {"x": 10, "y": 10, "width": 30, "height": 30,
                                                      "rectanglelabels": ["object"]}}
        check(world, post(world, "/predict", predict_body(data, [item])))

    assert fuzzed(run)[200] > 0 and world["ls"].hits  # the allowed source was reached and served


def test_mutated_predict_bodies_get_a_4xx_or_an_answer(world):
    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(FIELD_PATHS), JSON), min_size=1, max_size=3),
           st.sampled_from(["img-0", "missing"]), st.booleans())
    @example([], "img-0", False)  # the unmutated body: a mask, so the mutations are measured against a served request
    def run(changes, image_id, batch):
        body = predict_body({"image_id": image_id}, [keypoint(), keypoint(20, 30, id="k2", is_positive=False)])
        if batch:
            body["params"] = {"context": None}
            body["tasks"][0]["annotations"] = [{"id": 1, "result": [keypoint()]}]
        check(world, post(world, "/predict", mutated(body, changes)))

    assert fuzzed(run)[200] > 0


def test_rectangles_with_any_geometry_get_a_4xx_or_a_mask(world):
    number = st.one_of(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
                       st.integers(-10, 200), st.text(max_size=5), st.none(), st.booleans(), st.just([1]))
    @FUZZ
    @given(x=number, y=number, w=number, h=number, rotation=number)
    def run(x, y, w, h, rotation):
        item = {**keypoint(), "type": "rectanglelabels", "from_name": "box",
                "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": ["object"]}}
        check(world, post(world, "/predict", predict_body({"image_id": "img-0"}, [item])))

    fuzzed(run)


def test_raw_bodies_on_every_route_never_fault_the_server(world):
    raw = st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        JSON.map(lambda v: json.dumps(v).encode()),
        st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(1, 5000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.integers(60, 70).map(lambda n: json.dumps(predict_body({"image_id": "img-0"}, [keypoint()]))
                                .encode().replace(b'"image_id": "img-0"', b'"image_id": ' + b"[" * n + b"]" * n)),
        st.sampled_from([b"NaN", b'{"tasks": Infinity}', b"1" * 5000, b'{"a": "\\ud800"}', b'"\\udfff"',
                         b'{"action": "\\ud83d\\ude00"}', b"\xff\xfe{\x00}\x00", b'{"project": {"id": [[[[1]]]]}}']),
    )

    @FUZZ
    @given(raw, st.sampled_from(["/predict", "/setup", "/webhook"]))
    def run(payload, path):
        check(world, post(world, path, payload))

    fuzzed(run)


def test_setup_and_webhook_accept_any_json_without_faulting(world):
    config = st.one_of(st.just(LABEL_CONFIG), st.text(max_size=60),
                       st.sampled_from(['<!DOCTYPE x [<!ENTITY a "aaaa">]><View>&a;</View>', "<View>" * 300,
                                        "<View><Image name='i' value='$i'/><BrushLabels name='b' toName='i'/></View>",
                                        "<" + "a" * 10_000]))

    @FUZZ
    @given(st.fixed_dictionaries({"project": st.one_of(st.text(max_size=12), JSON), "schema": st.one_of(config, JSON),
                                  "hostname": JSON, "access_token": JSON}),
           st.dictionaries(st.sampled_from(["action", "project", "task", "annotation"]), JSON))
    def run(setup, hook):
        check(world, post(world, "/setup", setup))
        check(world, post(world, "/webhook", hook))

    fuzzed(run)
