"""Image access against hostile addresses, redirects and hosts (pipeline/image_access.py), by property.

- Every always-refused network (unspecified, multicast, link-local, metadata, reserved, site-local), in
  every IPv4 and IPv6 spelling that embeds an IPv4 address, under every `--allow-network` setting, is
  refused before any connection: name resolution is faked or numeric, and every connect is recorded.
- The Label Studio API key goes only to Label Studio data paths, on every hop of a redirect chain.
- A host answering anything at all (status lines, headers, Location and Content-Length values, bodies,
  chunking) makes reading an image return bytes or raise ImageAccessError, never another exception.
- A host trickling its status line, headers or body is cut at the download deadline (504).

Traffic stays on 127.0.0.1: the stubs are loopback servers run by the tests themselves.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from http_stub import Route, StubServer, guard_network

from pipeline.image_access import (
    LS_PATH_PATTERN,
    ImageAccess,
    ImageAccessError,
    address_refusal,
    read_image_bytes,
)

ALWAYS_REFUSED_V4 = ["0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "192.0.0.0/24",
                     "100.100.100.200/32", "168.63.129.16/32"]
ALWAYS_REFUSED_V6 = ["::/128", "fe80::/10", "fec0::/10", "ff00::/8", "64:ff9b:1::/48", "fd00:ec2::254/128"]
ALLOW_SETTINGS = [(), ("0.0.0.0/0",), ("::/0",), ("0.0.0.0/0", "::/0"), ("10.0.0.0/8", "fd00::/8"),
                  ("100.64.0.0/10",), ("169.254.0.0/16", "fe80::/10", "224.0.0.0/4", "ff00::/8")]


def _in(net: str, offset: int) -> ipaddress._BaseAddress:
    n = ipaddress.ip_network(net)
    return n[offset % n.num_addresses]


def _spellings(v4: ipaddress.IPv4Address) -> list[str]:
    """Every form an IPv6 address can embed `v4` in (and v4 itself)."""
    v = int(v4)
    hi, lo = f"{v >> 16:x}", f"{v & 0xFFFF:x}"
    forms = [str(v4), f"::ffff:{v4}", f"::ffff:0:{v4}", f"64:ff9b::{v4}", f"2002:{hi}:{lo}::1",
             f"2001:0:4136:e378:8000:63bf:{(~v >> 16) & 0xFFFF:x}:{~v & 0xFFFF:x}"]  # Teredo: client obfuscated
    if v > 1:  # ::0.0.0.1 is ::1, IPv6 loopback, not an embedded address
        forms.append(f"::{v4}")
    return forms


@st.composite
def refused_addresses(draw) -> str:
    """An address in an always-refused network, in any of its spellings."""
    if draw(st.booleans()):
        v4 = _in(draw(st.sampled_from(ALWAYS_REFUSED_V4)), draw(st.integers(0, 2**32)))
        return draw(st.sampled_from(_spellings(v4)))
    return str(_in(draw(st.sampled_from(ALWAYS_REFUSED_V6)), draw(st.integers(0, 2**128))))


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


@settings(max_examples=400, deadline=None)
@given(address=refused_addresses(), allow=st.sampled_from(ALLOW_SETTINGS), own=st.booleans(),
       trusted=st.booleans())
def test_always_refused_addresses_stay_refused_whatever_is_allowed(address, allow, own, trusted):
    """Refused for storage hosts and the Label Studio server alike, before any connection."""
    allow = allow + ((f"{address.split('%')[0]}/{128 if ':' in address else 32}",) if own else ())
    assert address_refusal(address, trusted, ImageAccess(allowed_networks=allow)) is not None
    host = _host(address)
    with pytest.MonkeyPatch.context() as mp:
        net = guard_network(mp, {"name.test": address})
        storage = ImageAccess(storage_hosts=(host, "name.test", f"{host}:8080"), allowed_networks=allow)
        label_studio = ImageAccess(label_studio_url=f"http://{host}:8080", api_key="k", allowed_networks=allow)
        for ref, access in ((f"http://{host}/x.png", storage), ("http://name.test/x.png", storage),
                            (f"http://{host}:8080/latest/meta-data/", storage),
                            ("/data/upload/1/x.png", label_studio)):
            with pytest.raises(ImageAccessError, match="resolves to") as e:
                read_image_bytes(ref, access)
            assert e.value.status == 403
        assert net["connects"] == []


@pytest.mark.parametrize("address, allow", [
    ("100.100.100.200", "100.64.0.0/10"), ("fd00:ec2::254", "fd00::/8"), ("169.254.169.254", "0.0.0.0/0"),
    ("0.0.0.0", "0.0.0.0/0"), ("64:ff9b::a9fe:a9fe", "::/0"), ("2002:a9fe:a9fe::1", "::/0"),
    ("::a9fe:a9fe", "::/0"), ("::ffff:0:a9fe:a9fe", "::/0"), ("192.0.0.192", "0.0.0.0/0"), ("fec0::1", "::/0"),
])
def test_the_reported_allow_network_overrides_are_closed(address, allow):
    assert address_refusal(address, False, ImageAccess(allowed_networks=(allow,))) is not None


@pytest.mark.parametrize("address", ["64:ff9b::a00:1", "::127.0.0.1", "::ffff:0:a00:1", "2002:a00:1::1"])
def test_embedded_private_addresses_need_their_ipv4_network_allowed(address):
    """The address a connection really reaches decides: ::/0 does not open 10.0.0.1 behind NAT64."""
    assert address_refusal(address, False, ImageAccess(allowed_networks=("::/0",))) is not None
    assert address_refusal(address, False, ImageAccess(allowed_networks=("10.0.0.0/8", "127.0.0.0/8"))) is None


def test_public_addresses_and_allowed_private_ones_still_pass():
    access = ImageAccess(allowed_networks=("10.0.0.0/8", "fd00::/8"))
    for address in ("8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "10.1.2.3", "fd00::5"):
        assert address_refusal(address, False, access) is None
    assert address_refusal("127.0.0.1", True, ImageAccess()) is None  # the operator's Label Studio server


# --------------------------------------------------------------------------------------------------
# The API key goes to data paths only


def _keyed_targets(server: StubServer) -> list[str]:
    return [target for target, headers in server.hits if "authorization" in headers]


def test_redirects_to_the_label_studio_api_are_refused_and_never_get_the_key():
    ls, storage = StubServer(), StubServer()
    with ls, storage:
        ls.routes.update({
            "/data/upload/1/toapi.png": Route(302, headers={"Location": "/api/projects/?page_size=1000"}),
            "/data/upload/1/toapi-abs.png": Route(302, headers={"Location": f"{ls.url}/api/current-user/token"}),
            "/api/projects/?page_size=1000": Route(200, body=b'{"results": []}'),
            "/api/current-user/token": Route(200, body=b'{"token": "x"}'),
        })
        storage.routes["/bucket/a.png"] = Route(302, headers={"Location": f"{ls.url}/api/current-user/token"})
        access = ImageAccess(label_studio_url=ls.url, api_key="SECRET", storage_hosts=(f"127.0.0.1:{storage.port}",),
                             allowed_networks=("127.0.0.0/8",))
        for ref in ("/data/upload/1/toapi.png", "/data/upload/1/toapi-abs.png", f"{storage.url}/bucket/a.png"):
            with pytest.raises(ImageAccessError, match="redirect refused: it is not a Label Studio data path"):
                read_image_bytes(ref, access, 1)
        assert not any(target.startswith("/api/") for target, _ in ls.hits)
        assert "authorization" not in storage.hits[0][1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.text(alphabet="abc/?=&.%2eAPIapi-_", max_size=30), absolute=st.booleans())
def test_every_hop_that_gets_the_key_is_a_data_path(ls_stub, path, absolute):
    ls = ls_stub
    ls.hits.clear()
    location = f"{ls.url if absolute else ''}/{path}"
    ls.routes["/data/upload/1/hop.png"] = Route(302, headers={"Location": location})
    access = ImageAccess(label_studio_url=ls.url, api_key="SECRET", max_image_bytes=4096, timeout_s=2)
    try:
        read_image_bytes("/data/upload/1/hop.png", access)
    except ImageAccessError:
        pass
    base = re.escape(access.label_studio.target.rstrip("/"))
    assert all(re.match(base, t) and LS_PATH_PATTERN.match(t) for t in _keyed_targets(ls))


@pytest.fixture(scope="module")
def ls_stub():
    with StubServer() as ls:
        yield ls


# --------------------------------------------------------------------------------------------------
# Anything a host may answer


class RawStub:
    """A loopback server answering every request with the same raw bytes, then closing the connection."""

    def __init__(self) -> None:
        self.response = b""
        self.requests: list[bytes] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                head = b""
                try:
                    while b"\r\n\r\n" not in head and len(head) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    self.requests.append(head)
                    conn.sendall(self.response)
                except OSError:
                    pass

    def close(self) -> None:
        self._sock.close()


@pytest.fixture(scope="module")
def raw_stub():
    stub = RawStub()
    yield stub
    stub.close()


_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
_CODES = st.sampled_from([200, 200, 200, 302, 302, 301, 303, 307, 308, 100, 204, 404, 500])
_STATUS = st.one_of(
    st.builds(lambda code: f"HTTP/1.1 {code} X", _CODES),
    st.builds(lambda v, code, reason: f"{v} {code} {reason}", st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2",
                                                                            "ICY", "HTTP/1.1x"]),
              st.one_of(_CODES, st.integers(-5, 1200)), st.sampled_from(["OK", "", "Found", "\u00e9"])),
    _TEXT,
)
_CONTENT_LENGTH = st.one_of(st.sampled_from(["\u00b2", "\u0663", "-1", "1e3", "0x10", " 5 ", "5, 5", "+5", "",
                                             "99999999999999999999999", "18446744073709551616", "0", "3"]),
                            st.integers(0, 10000).map(str))
_LOCATION = st.one_of(st.sampled_from(["http://[::1/x.png", "http://[::1]:80/x.png", "/data/upload/1/x.png",
                                       "/api/projects/", "//127.0.0.1/data/upload/1/x.png", "http://127.0.0.1:1/x",
                                       "data/../../api/", "\u00b2", "http://", "https://[fe80::1%25eth0]/x",
                                       "s3://bucket/x", "/data/local-files/?d=/etc/passwd", ""]), _TEXT)
_HEADER = st.one_of(
    st.tuples(st.just("Content-Length"), _CONTENT_LENGTH),
    st.tuples(st.just("Location"), _LOCATION),
    st.tuples(st.just("Content-Length"), _CONTENT_LENGTH),
    st.tuples(st.just("Location"), _LOCATION),
    st.tuples(st.just("Transfer-Encoding"), st.sampled_from(["chunked", "gzip, chunked", "identity", "x"])),
    st.tuples(st.sampled_from(["Content-Type", "Connection", "X"]), _TEXT),
    st.tuples(_TEXT, _TEXT),
)
_BODY = st.one_of(st.binary(max_size=300), st.sampled_from([b"zz\r\nabc\r\n0\r\n\r\n", b"5\r\nab", b"-1\r\n",
                                                            b"\xb2\r\nx\r\n", b"ffffffffffffffffff\r\n"]))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=_STATUS, headers=st.lists(_HEADER, max_size=5), body=_BODY,
       eol=st.sampled_from([b"\r\n", b"\n"]), ref=st.sampled_from(["/data/upload/1/x.png", "storage"]))
@example(status="HTTP/1.1 302 Found", headers=[("Location", "http://[::1/x.png")], body=b"", eol=b"\r\n",
         ref="/data/upload/1/x.png")
@example(status="HTTP/1.1 200 OK", headers=[("Content-Length", "\u00b2")], body=b"x", eol=b"\r\n", ref="storage")
@example(status="HTTP/1.1 200 OK", headers=[("Transfer-Encoding", "chunked")], body=b"zz\r\nabc\r\n0\r\n\r\n",
         eol=b"\r\n", ref="/data/upload/1/x.png")
def test_whatever_a_host_answers_is_bytes_or_an_image_access_error(raw_stub, status, headers, body, eol, ref):
    lines = [status] + [f"{k}: {v}" for k, v in headers]
    raw_stub.response = eol.join(line.encode("utf-8") for line in lines) + eol + eol + body
    raw_stub.requests.clear()
    access = ImageAccess(label_studio_url=raw_stub.url, api_key="SECRET", max_image_bytes=4096, timeout_s=2,
                         storage_hosts=(f"127.0.0.1:{raw_stub.port}",))
    ref = f"{raw_stub.url}/bucket/x.png" if ref == "storage" else ref
    try:
        data = read_image_bytes(ref, access)
    except ImageAccessError as e:
        assert 400 <= e.status < 600 and e.message
    else:
        assert isinstance(data, bytes) and len(data) <= 4096
    for request in raw_stub.requests:
        target = request.split(b" ", 2)[1].decode("ascii")
        assert b"Authorization" not in request or LS_PATH_PATTERN.match(target), target


@settings(max_examples=150, deadline=None)
@given(name=st.binary(min_size=1, max_size=12))
def test_any_escaped_file_name_is_bytes_or_an_image_access_error(tmp_path_factory, name):
    root = tmp_path_factory.getbasetemp() / "escaped-root"
    root.mkdir(exist_ok=True)
    access = ImageAccess(allowed_roots=(str(root),))
    for ref in (f"file://{root}/{quote_from_bytes(name)}.png", f"file://{root}/{quote_from_bytes(name, safe='')}"):
        try:
            read_image_bytes(ref, access)
        except ImageAccessError:
            pass


def test_the_reported_500s_are_image_access_errors(tmp_path):
    (tmp_path / "x.png").write_bytes(b"png")
    access = ImageAccess(allowed_roots=(str(tmp_path),))
    with pytest.raises(ImageAccessError, match="control characters"):
        read_image_bytes(f"file://{tmp_path}/x%00.png", access)
    ls = StubServer({"/data/upload/1/badloc.png": Route(302, headers={"Location": "http://[::1/x.png"}),
                     "/data/upload/1/badlen.png": Route(200, b"x", {"Content-Length": "\u00b2"}, send_length=False)})
    with ls:
        access = ImageAccess(label_studio_url=ls.url, api_key="k")
        with pytest.raises(ImageAccessError, match="Location is not a valid URL"):
            read_image_bytes("/data/upload/1/badloc.png", access)
        with pytest.raises(ImageAccessError, match="invalid Content-Length") as e:
            read_image_bytes("/data/upload/1/badlen.png", access)
        assert e.value.status == 502


# --------------------------------------------------------------------------------------------------
# A host that trickles its answer: the download deadline holds in every phase


class TrickleStub:
    """A loopback server that sends one raw response a byte every `delay` seconds (until the client leaves)."""

    def __init__(self, response: bytes, delay: float) -> None:
        self.response, self.delay = response, delay
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        with conn:
            try:
                conn.recv(65536)
                for byte in self.response:
                    conn.sendall(bytes([byte]))
                    time.sleep(self.delay)
            except OSError:
                pass

    def close(self) -> None:
        self._sock.close()


_SLOW_HEADERS = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Slow-%d: %s\r\n" % (n, b"a" * 20) for n in range(12))


@pytest.mark.parametrize("phase, response", [
    ("status line", b"HTTP/1.1 200 OK" + b" " * 300 + b"\r\nContent-Length: 3\r\n\r\nabc"),
    ("headers", _SLOW_HEADERS + b"Content-Length: 3\r\n\r\nabc"),
    ("body without a length", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"b" * 300),
    ("body with a length", b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n" + b"b" * 300),
])
def test_a_host_trickling_any_part_of_its_answer_is_cut_at_the_deadline(phase, response):
    stub = TrickleStub(response, delay=0.05)  # 15 s or more to send it all
    access = ImageAccess(storage_hosts=(f"127.0.0.1:{stub.port}",), allowed_networks=("127.0.0.0/8",),
                         timeout_s=1.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(ImageAccessError) as e:
            read_image_bytes(f"http://127.0.0.1:{stub.port}/x.png", access)
        assert e.value.status == 504 and "took too long" in e.value.message
        assert time.monotonic() - t0 < 5.0  # was: as long as the host kept trickling its headers
    finally:
        stub.close()


@pytest.mark.parametrize("hop", ["first", "redirect"])
def test_a_name_server_that_never_answers_is_cut_at_the_deadline(monkeypatch, hop):
    """Resolving the host name is inside the download's deadline, on the first hop and on a redirect's: a
    lookup the system resolver holds (a name server that never answers) is a 504 at the deadline. The resolver
    is replaced here because a silent DNS server cannot be run on loopback; it is released at the end."""
    import pipeline.image_access as image_access

    real, release = socket.getaddrinfo, threading.Event()

    def silent_name_server(host, *args, **kwargs):
        if host == "images.example.com":
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(image_access.socket, "getaddrinfo", silent_name_server)
    target = "http://images.example.com/x.png"
    with StubServer({"/x.png": Route(302, headers={"Location": target})}) as stub:
        access = ImageAccess(storage_hosts=("images.example.com", f"127.0.0.1:{stub.port}"),
                             allowed_networks=("127.0.0.0/8",), timeout_s=1.0)
        t0 = time.monotonic()
        try:
            with pytest.raises(ImageAccessError) as e:
                read_image_bytes(target if hop == "first" else f"http://127.0.0.1:{stub.port}/x.png", access)
            assert e.value.status == 504 and "took too long" in e.value.message
            assert time.monotonic() - t0 < 5.0  # was: as long as the resolver took (30 s here)
            assert len(stub.hits) == (hop == "redirect")
        finally:
            release.set()
