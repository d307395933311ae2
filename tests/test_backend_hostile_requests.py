"""Hostile request bodies against the real FastAPI app (fast: a stub segmenter that runs the on-screen start
choice, as the engine does, and answers an empty mask).

- encodings: only UTF-8 is JSON here, so the depth and surrogate checks see the text as it is;
- numbers beyond float range anywhere a coordinate is read, and every client-derived computation, map to
  a 4xx, never a 500;
- bodies are parsed off the event loop, at most `large_body_concurrency` large ones at once, and the
  unauthenticated /webhook has a 1 MiB limit;
- /setup keeps a bounded number of label configs, and the log holds only short client strings;
- against a real uvicorn server: a declared length takes no large-body slot, a stalled body is a 408 that frees
  its slot, and a client leaving mid-body is one INFO line (499), not a 500 with a traceback;
- a batch /predict has a cap on its saved prompt items (413) and stops once its client has gone.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import uvicorn
from backend_support import LABEL_CONFIG
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors import json_body, server
from connectors.json_body import nesting_depth, parse_json
from connectors.onscreen import start_region
from connectors.protocol import ProtocolError
from connectors.segment import SegmentResult
from connectors.server import MAX_LOGGED_CHARS, MAX_LOGGED_ERROR_CHARS, ServerSettings, create_app

SIZE = (64, 96)
BIG = 10**400
POLY_CONFIG = LABEL_CONFIG.replace(
    "</View>", '<PolygonLabels name="poly" toName="image"><Label value="object"/></PolygonLabels></View>')


class StubSegmenter:
    """Runs the on-screen start choice on each request (what the engine does first) and answers empty."""

    def __init__(self) -> None:
        self.requests = []

    async def segment(self, req):
        self.requests.append(req)
        start_region(req.start, req.clicks)
        return SegmentResult(rle=[0, 0, 0, 0], score=0.5, image_id=req.image_id or "x", path="replay", steps=1, area=0)

    def ready(self) -> bool:
        return True


def make_client(**settings_) -> TestClient:
    return TestClient(create_app(ServerSettings(model_version="mv", **settings_), StubSegmenter()),
                      raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client():
    with make_client() as c:
        yield c


def keypoint(x=50.0, y=50.0, **over) -> dict:
    item = {"original_width": SIZE[1], "original_height": SIZE[0], "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["object"]}, "is_positive": True,
            "id": "k1", "from_name": "kp", "to_name": "image", "type": "keypointlabels"}
    item.update(over)
    return item


def polygon(points, kind="polygonlabels") -> dict:
    value = {"points": points, kind: ["object"]} if kind == "polygonlabels" else \
        {"format": "polygon", "points": points, "brushlabels": ["object"]}
    return {"id": "p1", "type": kind, "to_name": "image", "from_name": "poly" if kind == "polygonlabels" else "tag",
            "original_width": SIZE[1], "original_height": SIZE[0], "value": value}


def body(items, data=None, annotations=(), predictions=(), config=POLY_CONFIG) -> dict:
    task = {"id": 7, "data": data or {"image_id": "img-0"}, "annotations": list(annotations),
            "predictions": list(predictions)}
    return {"tasks": [task], "project": "3.1", "label_config": config, "params": {"context": {"result": items}}}


def post(c, path, raw: bytes):
    return c.post(path, content=raw, headers={"content-type": "application/json"})


def answered(r) -> None:
    assert r.status_code < 500, r.text[:300]
    if r.status_code >= 400:
        assert isinstance(r.json().get("error"), str)


# --------------------------------------------------------------------------------------------------
# The auditor's 500s


@pytest.mark.parametrize("kind", ["polygonlabels", "brushlabels"])
def test_a_huge_integer_in_on_screen_polygon_points_is_no_fault(client, kind):
    raw = json.dumps(body([keypoint()], annotations=[{"id": 1, "result": [polygon([[0, 0], [1, 1], [2, 3]], kind)]}]))
    r = post(client, "/predict", raw.replace("[[0, 0]", f"[[{BIG}, 0]").encode())
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
def test_bodies_in_other_unicode_encodings_are_a_400(client, encoding):
    surrogate = json.dumps(body([keypoint()], data={"image_id": "\ud800x"}), ensure_ascii=True)
    deep = '{"x": "a\\"", "action": %s, "y": "b"}' % ("[" * 900 + "]" * 900)
    for path, text in (("/predict", surrogate), ("/webhook", deep), ("/setup", deep)):
        r = post(client, path, text.encode(encoding))
        assert r.status_code == 400 and "not UTF-8" in r.json()["error"], (path, r.text)


def test_utf8_with_or_without_a_bom_is_served(client):
    raw = json.dumps(body([keypoint()]), ensure_ascii=False).encode()
    assert post(client, "/predict", raw).status_code == 200
    assert post(client, "/predict", b"\xef\xbb\xbf" + raw).status_code == 200


def test_a_keypoint_beyond_float_range_is_a_422(client):
    for item in (keypoint(x=BIG), keypoint(y=-BIG), {**keypoint(), "type": "rectanglelabels", "from_name": "box",
                                                      "value": {"x": 1, "y": 1, "width": BIG, "height": 2,
                                                                "rectanglelabels": ["object"]}}):
        r = post(client, "/predict", json.dumps(body([item])).encode())
        assert r.status_code == 422 and "finite number" in r.json()["error"]
        assert len(r.json()["error"]) < 400  # the 400-digit number is not echoed back whole


def test_an_on_screen_candidates_fault_is_a_4xx(monkeypatch, client):
    """Every computation on the client's body runs inside the 4xx mapping, the start candidates included."""
    def broken(task, prompt):
        raise OverflowError("a value from the request")

    monkeypatch.setattr(server, "onscreen_candidates", broken)
    r = post(client, "/predict", json.dumps(body([keypoint()])).encode())
    assert r.status_code == 422 and "OverflowError" in r.json()["error"]


# --------------------------------------------------------------------------------------------------
# Hostile bodies: never a 5xx


_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(10**500), 10**500), st.floats(allow_nan=False),
                    st.text(max_size=6), st.characters(categories=["Cs"]))
_JSON = st.recursive(_SCALAR, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                     max_leaves=10)
_POINTS = st.one_of(_JSON, st.lists(st.lists(_SCALAR, max_size=3), max_size=8),
                    st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)).map(list), min_size=3, max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(points=_POINTS, kind=st.sampled_from(["polygonlabels", "brushlabels"]), x=st.one_of(_SCALAR, st.floats(0, 100)),
       rle=_JSON, encoding=st.sampled_from(["utf-8", "utf-8", "utf-16", "utf-32"]),
       path=st.sampled_from(["/predict", "/setup", "/webhook"]), ascii_only=st.booleans())
def test_hostile_numbers_regions_and_encodings_never_fault_the_server(client, points, kind, x, rle, encoding, path,
                                                                        ascii_only):
    brush = {**polygon([], "brushlabels"), "value": {"format": "rle", "rle": rle, "brushlabels": ["object"]}}
    payload = body([keypoint(x=x)], annotations=[{"id": 1, "result": [polygon(points, kind), brush]}])
    if path == "/setup":
        payload = {"project": x, "schema": POLY_CONFIG, "hostname": points}
    text = json.dumps(payload, ensure_ascii=ascii_only)
    try:
        raw = text.encode(encoding)
    except UnicodeEncodeError:  # a lone surrogate written raw: only its escaped form can be sent
        raw = json.dumps(payload).encode(encoding)
    r = post(client, path, raw)
    answered(r)
    if encoding != "utf-8":
        assert r.status_code == 400


def _reference_depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((_reference_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_reference_depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=200, deadline=None)
@given(_JSON, st.sampled_from([1, 2, 7, 1 << 20]))
def test_the_depth_count_matches_the_parsed_nesting_across_chunks(value, chunk):
    raw = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(json_body, "_CHUNK", chunk)  # small chunks: the running depth crosses their boundaries
        assert nesting_depth(raw) == _reference_depth(value)


def _scanned_depth(raw: bytes) -> int:
    """The reference: one byte at a time, in or out of a string (an unterminated string runs to the end)."""
    depth = peak = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        elif byte in b"[{":
            depth += 1
            peak = max(peak, depth)
        elif byte in b"]}":
            depth -= 1
    return peak


@settings(max_examples=300, deadline=None)
@given(_JSON, st.sampled_from([1, 3, 1 << 20]), st.booleans())
def test_the_depth_count_agrees_with_a_byte_scanner_on_valid_json(value, chunk, ascii_only):
    raw = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(json_body, "_CHUNK", chunk)
        assert nesting_depth(raw) == _scanned_depth(raw)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b'"', b"\\", b"[", b"]", b"{", b"}", b"a", b"\n", b"\xc3\xa9"]), max_size=60)
       .map(b"".join))
def test_the_depth_count_agrees_with_a_byte_scanner_on_any_bytes(raw):
    assert nesting_depth(raw) == _scanned_depth(raw)


_HOSTILE_BODIES = {  # each 1 MiB (what the unauthenticated /webhook takes): quadratic string scans took ~an hour
    "unterminated escaped quotes": b'"' + b'\\"' * (1 << 19),
    "quotes": b'"' * (1 << 20),
    "backslashes": b"\\" * (1 << 20),
    "an open string of backslashes": b'"' + b"\\" * (1 << 20),
    "escaped quotes in an open array": b'["' + b'\\"[' * (1 << 18),
    "many short strings": b'["a\\"' * (1 << 17),
}


@pytest.mark.parametrize("name", list(_HOSTILE_BODIES))
def test_hostile_string_runs_are_refused_in_linear_time(name):
    raw = _HOSTILE_BODIES[name]
    t0 = time.perf_counter()
    with pytest.raises(ProtocolError) as e:
        parse_json(raw)
    assert e.value.status == 400
    assert time.perf_counter() - t0 < 5.0  # was O(n^2): minutes for 64 KiB, about an hour for 1 MiB


def test_non_utf8_bodies_are_refused_before_their_depth_is_counted(monkeypatch):
    counted = []
    monkeypatch.setattr(json_body, "nesting_depth", lambda raw: counted.append(raw) or 0)
    for raw in (b"\xff\xfe{\x00}\x00", '{"a": "\ud800"}'.encode("utf-8", "surrogatepass"), b'{"a": "\xe9"}'):
        with pytest.raises(ProtocolError, match="not UTF-8") as e:
            parse_json(raw)
        assert e.value.status == 400
    assert counted == []


# --------------------------------------------------------------------------------------------------
# Parsing off the event loop; large bodies bounded; /webhook small


def test_bodies_are_parsed_in_a_worker_thread_while_health_answers(monkeypatch):
    entered, release, order = threading.Event(), threading.Event(), []

    def held_parse(raw):
        try:
            asyncio.get_running_loop()
            order.append("parsed on the event loop")
        except RuntimeError:
            order.append("parsed in a worker thread")
        entered.set()
        release.wait(timeout=30)
        return json.loads(raw)

    monkeypatch.setattr(server, "parse_json", held_parse)
    with make_client() as c:
        busy = threading.Thread(target=lambda: order.append(post(c, "/predict", json.dumps(body([keypoint()])).encode())
                                                            .status_code))
        busy.start()
        assert entered.wait(timeout=30)
        order.append(c.get("/health").status_code)  # answered while the body is still being parsed
        release.set()
        busy.join()
    assert order == ["parsed in a worker thread", 200, 200]


def test_at_most_the_configured_number_of_large_bodies_are_parsed_at_once(monkeypatch):
    lock, active, peak, entered, release = threading.Lock(), [0], [0], threading.Semaphore(0), threading.Event()

    def counting_parse(raw):
        if len(raw) <= server.LARGE_BODY_BYTES:
            return json.loads(raw)
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        entered.release()
        release.wait(timeout=30)
        with lock:
            active[0] -= 1
        return json.loads(raw)

    monkeypatch.setattr(server, "parse_json", counting_parse)
    large = json.dumps({"action": "x", "pad": "p" * (server.LARGE_BODY_BYTES + 10)}).encode()
    with make_client(large_body_concurrency=1, max_webhook_bytes=4 << 20) as c:
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(post(c, "/webhook", large).status_code))
                   for _ in range(3)]
        for t in threads:
            t.start()
        assert entered.acquire(timeout=30)
        assert not entered.acquire(timeout=0.5)  # the other two wait for the slot, unread and unparsed
        small = post(c, "/setup", json.dumps({"project": "1.1", "schema": LABEL_CONFIG}).encode())
        assert small.status_code == 200  # a small body does not wait for the large ones
        release.set()
        for t in threads:
            t.join()
    assert statuses == [200, 200, 200] and peak[0] == 1


def test_the_unauthenticated_webhook_takes_at_most_1_mib(client):
    big = json.dumps({"action": "ANNOTATION_UPDATED", "pad": "x" * (1 << 20)}).encode()
    r = post(client, "/webhook", big)
    assert r.status_code == 413 and "1048576" in r.json()["error"]
    r = client.post("/webhook", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))  # chunked
    assert r.status_code == 413
    assert post(client, "/webhook", json.dumps({"action": "PROJECT_UPDATED"}).encode()).status_code == 200


# --------------------------------------------------------------------------------------------------
# Per-client state and logs


def test_setup_keeps_a_bounded_number_of_label_configs(client):
    labels = "".join(f'<Label value="l{i:05d}"/>' for i in range(3000))
    xml = LABEL_CONFIG.replace('<Label value="background_thing" background="#0000FF"/>', labels)
    for pid in range(server.MAX_PROJECT_CONFIGS + 20):
        assert post(client, "/setup", json.dumps({"project": f"{pid}.1", "schema": xml}).encode()).status_code == 200
    configs = client.app.state.backend.label_configs
    assert len(configs) == server.MAX_PROJECT_CONFIGS and configs.chars <= server.MAX_PROJECT_CONFIG_CHARS
    newest = {**body([keypoint()], config=None), "project": f"{server.MAX_PROJECT_CONFIGS + 19}.1"}
    del newest["label_config"]
    assert post(client, "/predict", json.dumps(newest).encode()).status_code == 200  # served from /setup's config
    oldest = {**newest, "project": "0.1"}
    assert post(client, "/predict", json.dumps(oldest).encode()).status_code == 422  # dropped: least recently used
    huge = LABEL_CONFIG.replace("</View>", "<!--" + "x" * 900_000 + "--></View>")
    for pid in range(10):
        post(client, "/setup", json.dumps({"project": f"h{pid}.1", "schema": huge}).encode())
    assert configs.chars <= server.MAX_PROJECT_CONFIG_CHARS and len(configs) <= 5


def test_client_strings_are_cut_short_in_the_log(client, caplog):
    long = "P" * 2_000_000
    with caplog.at_level("INFO", logger="connectors"):
        post(client, "/setup", json.dumps({"project": long + ".1", "hostname": "H" * 2_000_000}).encode())
        b = body([keypoint(id="R" * 2_000_000)])
        b["project"] = long
        post(client, "/predict", json.dumps(b).encode())
        post(client, "/predict", json.dumps(body([keypoint(value={"x": 5, "y": 5, "keypointlabels": [long]})]))
             .encode())
        post(client, "/webhook", json.dumps({"action": "A" * 500_000, "project": {"id": "I" * 500_000}}).encode())
    fields = [r.fields for r in caplog.records if r.getMessage() == "request"][-4:]
    assert [f["status"] for f in fields] == [200, 200, 422, 200]
    for f in fields:
        for key, value in f.items():
            limit = MAX_LOGGED_ERROR_CHARS if key == "error" else MAX_LOGGED_CHARS
            assert not isinstance(value, str) or len(value) <= limit, key
    region_keys = [r.region_key for r in client.app.state.backend.segmenter.requests[-1:]]
    assert region_keys and len(region_keys[0]) <= 3 + 64


def test_long_region_ids_keep_regions_apart_in_a_short_key(client):
    seg = client.app.state.backend.segmenter
    for suffix in ("a", "b"):
        post(client, "/predict", json.dumps(body([keypoint(id="R" * 5000 + suffix)])).encode())
    a, b = (r.region_key for r in seg.requests[-2:])
    assert a != b and len(a) <= 3 + 64 and a.startswith("id:RRR")
    np.testing.assert_equal(len(a), len(b))


# --------------------------------------------------------------------------------------------------
# Slow, stalled and vanishing clients, against a real uvicorn server on loopback


@contextmanager
def live_server(segmenter=None, **settings_) -> Iterator[tuple[int, Any]]:
    """The app served by uvicorn in a thread on a free loopback port: (port, app); stopped on exit."""
    app = create_app(ServerSettings(model_version="mv", **settings_), segmenter or StubSegmenter())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            if srv.started:
                break
            time.sleep(0.05)
        yield sock.getsockname()[1], app
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _open_body(port: int, path: str, length: int, sent: bytes = b"") -> socket.socket:
    """A connection that declared a `length`-byte body and sent only `sent` of it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
              .encode() + sent)
    return s


def _status(s: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        data = s.recv(4096)
        if not data:
            break
        head += data
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0


def _large_webhook(size: int) -> bytes:
    return json.dumps({"action": "x", "pad": "p" * size}).encode()


def test_clients_that_declare_large_bodies_and_send_nothing_hold_no_large_body_slot():
    with live_server(body_timeout_s=60, max_webhook_bytes=4 << 20) as (port, _):
        holders = [_open_body(port, "/webhook", 2_000_000) for _ in range(2)]  # as many as there are slots
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/webhook", content=_large_webhook(1_200_000), timeout=20)
            assert r.status_code == 200  # was: waited for a slot until the holders went away
        finally:
            for h in holders:
                h.close()


def test_a_stalled_body_is_answered_408_and_its_large_body_slot_released():
    with live_server(body_timeout_s=0.5, min_body_rate=1 << 20, max_webhook_bytes=4 << 20) as (port, _):
        large = _large_webhook(1_200_000)
        stalled = [_open_body(port, "/webhook", len(large), large[:1_100_000]) for _ in range(2)]  # both slots
        idle = _open_body(port, "/webhook", 100, b"{")
        try:
            assert [_status(s) for s in (*stalled, idle)] == [408, 408, 408]  # was: held open forever
            r = httpx.post(f"http://127.0.0.1:{port}/webhook", content=large, timeout=20)
            assert r.status_code == 200
        finally:
            for s in (*stalled, idle):
                s.close()


def test_a_client_that_leaves_mid_body_is_one_info_line_not_a_500(caplog):
    with caplog.at_level("INFO", logger="connectors"), live_server() as (port, _):
        s = _open_body(port, "/webhook", 100, b'{"action":')
        time.sleep(0.3)
        s.close()
        for _ in range(200):
            requests = [r for r in caplog.records if r.getMessage() == "request"]
            if requests:
                break
            time.sleep(0.05)
        assert [(r.levelname, r.fields["status"]) for r in requests] == [("INFO", server.CLIENT_CLOSED)]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]  # was: a traceback


# --------------------------------------------------------------------------------------------------
# A batch /predict: bounded, and stopped when its client has gone


def batch_body(n_tasks: int) -> bytes:
    tasks = [{"id": i, "data": {"image_id": f"img-{i}"}, "annotations": [{"id": i, "result": [keypoint(id=f"k{i}")]}]}
             for i in range(n_tasks)]
    return json.dumps({"tasks": tasks, "project": "3.1", "label_config": LABEL_CONFIG}).encode()


def test_a_batch_over_the_prompt_item_cap_is_refused_before_any_region_runs():
    with make_client(max_batch_items=10) as c:
        seg = c.app.state.backend.segmenter
        r = post(c, "/predict", batch_body(11))
        assert r.status_code == 413 and "11 saved keypoints and rectangles" in r.json()["error"]
        assert "at most 10" in r.json()["error"] and seg.requests == []
        r = post(c, "/predict", batch_body(10))
        assert r.status_code == 200 and len(seg.requests) == 10


class SlowSegmenter(StubSegmenter):
    async def segment(self, req):
        await asyncio.sleep(0.05)
        return await super().segment(req)


def test_a_batch_whose_client_has_gone_stops_sending_regions_to_the_segmenter(caplog):
    n = 200  # 200 regions x 0.05 s / 4 at once: 2.5 s when run to the end
    seg = SlowSegmenter()
    with caplog.at_level("INFO", logger="connectors"), live_server(seg, batch_concurrency=4) as (port, _):
        raw = batch_body(n)
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
        time.sleep(0.5)
        s.close()
        requests = []
        for _ in range(300):
            requests = [r for r in caplog.records if r.getMessage() == "request"]
            if requests:
                break
            time.sleep(0.05)
        served = len(seg.requests)
        time.sleep(1.0)
        assert [r.fields["status"] for r in requests] == [server.CLIENT_CLOSED]  # was: 200 after running all
        assert served < n and len(seg.requests) == served  # nothing scheduled once it was seen gone
