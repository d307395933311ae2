"""What a client sees when Ray fails (connectors/actors.py): a fixed message and an error id, while the log
keeps Ray's own text (pid, node IP, actor id, namespace, creation-task tracebacks). No Ray is started: the
errors are Ray's real exception types, raised by stand-in actor handles."""
from __future__ import annotations

import asyncio
import logging
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.core.generated.common_pb2 import ActorDiedErrorContext
from ray.exceptions import ActorDiedError, RayTaskError

import connectors.actors as actors
from connectors.segment import EncodeFirst, SegmentError

_WORDS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=6, max_size=20)


def _died(pid: int, ip: str, namespace: str, path: str) -> list[ActorDiedError]:
    """Ray's two flavours: a dead worker process, and an actor whose creation task raised."""
    ctx = ActorDiedErrorContext(class_name="_EncoderActor", actor_id=b"\x01" * 16, pid=pid, node_ip_address=ip,
                                ray_namespace=namespace, error_message="The actor is dead because its worker "
                                "process has died. Worker exit type: SYSTEM_ERROR")
    cause = FileNotFoundError(f"{path}/features.lance/_versions/missing")
    creation = RayTaskError("_EncoderActor.__init__", f"Traceback (most recent call last):\n  File \"{path}/"
                            f"connectors/engine.py\", line 270, in __init__\n{cause!r}", cause)
    return [ActorDiedError(ctx), ActorDiedError(creation)]


class _Remote:
    """An actor method: `.remote()` gives what fails with `error` when awaited (or passed to ray.get)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def remote(self, *args):
        return self

    def __await__(self):
        raise self.error
        yield  # a generator, as __await__ must return an iterator


class _Handle:
    """An actor handle whose every method call fails with `error`."""

    def __init__(self, error: BaseException) -> None:
        self.segment = self.ping = self.encode = _Remote(error)


def _pool(error: BaseException) -> actors.ActorPool:
    pool = object.__new__(actors.ActorPool)
    pool.actors, pool.restart_timeout_s, pool.retries = [_Handle(error)], 1.0, 0
    pool.encoder = _Handle(error)
    pool.router = actors.StickyRouter(1)
    # an actor dead for good is created anew (failing the same way) until the crash-loop bound answers 503
    pool.max_restarts, pool.recreated = 0, 0
    pool._dead, pool._replacing, pool._recreations = set(), {}, {}
    pool._new_actor = lambda index: _Handle(error)
    return pool


def _assert_clean(e: SegmentError, secrets: list[str]) -> None:
    assert e.status in (500, 503) and "error id" in e.message
    text = re.sub(r"error id [0-9a-f]{12}", "error id", e.message)  # a random hex id may hold a pid's digits
    for secret in secrets:
        assert secret not in text, secret
    assert "Traceback" not in e.message and "0101010101" not in e.message


def _encode(error: BaseException) -> None:
    """The pool's on-demand encode (the encoder actor failing with `error`), as a serving actor's EncodeFirst
    answer starts it."""
    asyncio.run(_pool(error)._encode(EncodeFirst("id", "ref", 1)))


@settings(max_examples=40, deadline=None)
@given(pid=st.integers(1000, 2**22), ip=st.ip_addresses(v=4).map(str), namespace=_WORDS, path=_WORDS)
def test_ray_failure_text_never_reaches_the_client(pid, ip, namespace, path):
    secrets = [str(pid), ip, namespace, "/" + path]
    for error in _died(pid, ip, namespace, "/" + path):
        with pytest.raises(SegmentError) as e:
            _encode(error)
        _assert_clean(e.value, secrets)
        with pytest.raises(SegmentError) as e:
            asyncio.run(_pool(error)._segment_on(0, None))
        _assert_clean(e.value, secrets)


def test_the_log_keeps_rays_text_under_the_id_the_client_gets(monkeypatch, caplog):
    error = _died(31337, "10.0.3.17", "ns-1", "/srv/app")[0]
    with caplog.at_level(logging.ERROR, logger="connectors"), pytest.raises(SegmentError) as e:
        _encode(error)
    error_id = e.value.message.rsplit("error id ", 1)[1].rstrip(")")
    logged = [r for r in caplog.records if r.fields.get("error_id") == error_id]
    assert logged and "31337" in logged[0].fields["error"] and "10.0.3.17" in logged[0].fields["error"]
