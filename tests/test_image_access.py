"""Where the backend may read images from (pipeline/image_access.py), attacked the ways a task can.

Network traffic goes to 127.0.0.1 only: stub servers play Label Studio and a host that must never be
reached; for private and metadata addresses, name resolution is faked and every socket connect is
recorded (and refused for anything but loopback), so the tests prove the refusal comes before any
connection without sending a packet anywhere.
"""
from __future__ import annotations

import base64
import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from http_stub import Route, StubServer, guard_network
from PIL import Image

from pipeline.image_access import ImageAccess, ImageAccessError, parse_http_url, plan, read_image_bytes

PNG = (lambda b: (Image.new("RGB", (8, 6), (200, 10, 10)).save(b, "PNG"), b.getvalue())[1])(io.BytesIO())
SECRET = b"root:x:0:0:CANARY-SECRET-7f3a:/root:/bin/bash\n"

FAKE_DNS = {  # names a task or a redirect may use; resolution is faked, nothing is ever sent to these
    "metadata.test": "169.254.169.254",
    "private.test": "10.0.0.7",
    "mapped.test": "::ffff:169.254.169.254",
    "ec2v6.test": "fd00:ec2::254",
    "shared.test": "100.64.0.1",
    "zero.test": "0.0.0.0",
    "storage.test": "127.0.0.1",
}


@pytest.fixture
def net(monkeypatch):
    return guard_network(monkeypatch, FAKE_DNS)


@pytest.fixture
def servers(tmp_path):
    forbidden = StubServer({"/x.png": Route(body=PNG), "/data/upload/1/x.png": Route(body=PNG)})
    ls = StubServer()
    fp = forbidden.port
    with forbidden, ls:
        ls.routes.update({
            "/data/upload/1/x.png": Route(body=PNG),
            "/data/upload/1/big.png": Route(body=PNG + b"\0" * 5000),
            "/data/upload/1/big-unsized.png": Route(body=PNG + b"\0" * 5000, send_length=False),
            "/data/upload/1/to-forbidden.png": Route(302, headers={"Location": f"{forbidden.url}/x.png"}),
            "/data/upload/1/to-localhost.png": Route(302, headers={"Location": f"http://localhost:{fp}/x.png"}),
            "/data/upload/1/to-metadata.png": Route(302, headers={"Location": "http://metadata.test/latest/"}),
            "/data/upload/1/to-storage.png": Route(302, headers={"Location": f"http://storage.test:{fp}/x.png"}),
            "/data/upload/1/to-self.png": Route(302, headers={"Location": "/data/upload/1/x.png"}),
            "/data/upload/1/loop.png": Route(302, headers={"Location": "/data/upload/1/loop.png"}),
            "/data/upload/1/passwd.png": Route(body=SECRET),
        })
        root = tmp_path / "root"
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "a.png").write_bytes(PNG)
        (tmp_path / "secret.txt").write_bytes(SECRET)
        os.symlink(tmp_path / "secret.txt", root / "escape.png")
        os.symlink(tmp_path, root / "outdir")
        os.symlink(root / "sub" / "a.png", root / "inside.png")
        os.mkfifo(root / "fifo.png")
        access = ImageAccess(label_studio_url=ls.url, api_key="test-key", allowed_roots=(str(root),),
                             max_image_bytes=4096)
        yield {"ls": ls, "forbidden": forbidden, "root": root, "access": access, "tmp": tmp_path}


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:1\\@127.0.0.1:2/data/upload/1/x.png",  # the reported SSRF shape
    "http://user@127.0.0.1/x", "http://user:pw@127.0.0.1/x", "http://127.0.0.1\\x", "http://127.0.0.1/a\\b",
    "http://127.0.0.1\t/x", "http://127.0.0.1/x\n", "http://127.0.0.1/x\r\nHost: evil", "http://127.0.0.1/\x00",
    "http://127.1/x", "http://2130706433/x", "http://0x7f.0.0.1/x", "http://0x7f000001/x", "http://017700000001/x",
    "http://127.0.0.01/x", "http://127.000.0.1/x", "http://[::1%25lo]/x", "http://[::1/x", "http://host:080/x",
    "http://host:0/x", "http://host:65536/x", "http://host:/x", "http://host:8o/x", "http://ho%73t/x",
    "http://hóst/x", "http://host./x", "http://-host/x", "http:///x", "http:/host/x", "ftp://host/x",
    "gopher://host/x", "javascript:alert(1)", "file:///etc/passwd", "http://host/a/../b", "http://host/a/%2e%2e/b",
    "http://host//x", "http://host/%zz", "http://host/x?d=../../etc/passwd"
])
def test_non_canonical_urls_are_refused_outright(url):
    with pytest.raises(ImageAccessError):
        parse_http_url(url)


def test_canonical_urls_parse_into_the_one_value_the_connection_uses():
    u = parse_http_url("HTTP://LS.Example.org:8080/data/upload/1/a b%20c.png?d=imgs/x.png#frag")
    assert (u.scheme, u.host, u.port) == ("http", "ls.example.org", 8080)
    assert u.target == "/data/upload/1/a%20b%20c.png?d=imgs/x.png"
    assert str(parse_http_url("https://[::1]/x")) == "https://[::1]/x" and parse_http_url("https://[::1]/x").port == 443


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60), st.sampled_from(["@", "\\", "%40", ":", "/", "#"]))
def test_whatever_parses_names_the_host_every_reader_agrees_on(noise, sep):
    """Any URL the parser accepts has a host that appears verbatim right after '//' and before the path."""
    text = f"http://127.0.0.1:9{sep}{noise}"
    try:
        u = parse_http_url(text)
    except ImageAccessError:
        return
    rest = text.split("//", 1)[1]
    authority = rest[: min([i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0] or [len(rest)])]
    assert "@" not in authority and "\\" not in text and authority.split(":")[0] == u.host == "127.0.0.1"


def test_the_reported_ssrf_shape_never_reaches_the_other_host(servers, net):
    ls, forbidden, access = servers["ls"], servers["forbidden"], servers["access"]
    for ref in (f"http://127.0.0.1:{forbidden.port}\\@127.0.0.1:{ls.port}/data/upload/1/x.png",
                f"http://127.0.0.1:{forbidden.port}@127.0.0.1:{ls.port}/data/upload/1/x.png",
                f"{forbidden.url}/data/upload/1/x.png", f"http://localhost:{forbidden.port}/x.png"):
        with pytest.raises(ImageAccessError):
            read_image_bytes(ref, access)
    assert forbidden.hits == [] and ls.hits == []


def test_label_studio_paths_are_fetched_with_the_key_and_redirects_checked(servers, net):
    ls, forbidden, access = servers["ls"], servers["forbidden"], servers["access"]
    assert read_image_bytes("/data/upload/1/x.png", access) == PNG
    assert read_image_bytes("upload/1/x.png", access) == PNG
    assert read_image_bytes(f"{ls.url}/data/upload/1/x.png", access) == PNG
    assert read_image_bytes("/data/upload/1/to-self.png", access) == PNG
    assert all(h["authorization"] == "Token test-key" for _, h in ls.hits)
    for ref, message in [("/data/upload/1/to-forbidden.png", "neither the Label Studio server"),
                         ("/data/upload/1/to-localhost.png", "neither the Label Studio server"),
                         ("/data/upload/1/to-metadata.png", "neither the Label Studio server"),
                         ("/data/upload/1/to-storage.png", "neither the Label Studio server"),
                         ("/data/upload/1/loop.png", "redirected more than"),
                         (f"{ls.url}/api/projects/", "not a Label Studio data path"),
                         ("/data/local-files/?d=../../etc/passwd", "'..'"),
                         ("/data/local-files/?d=imgs/%2e%2e/%2e%2e/etc/passwd", "'..'"),
                         ("/data/local-files/?d=/etc/passwd", "relative"),
                         ("/data/local-files/?d=imgs/a.png&d=../x", "'..'"),
                         ("/data/upload/../../api/projects", "'..'"),
                         ("//127.0.0.1/x.png", "network path")]:
        with pytest.raises(ImageAccessError, match=message):
            read_image_bytes(ref, access)
    assert forbidden.hits == []
    assert "metadata.test" not in net["lookups"]  # refused by name, before resolving it


@pytest.mark.parametrize("status", [401, 403])
def test_label_studio_refusing_the_key_says_so_without_quoting_it(servers, net, status):
    """A refused key is the operator's to fix: the error names LABEL_STUDIO_API_KEY (never its value); another
    host's 401/403 stays an unavailable image."""
    ls, forbidden = servers["ls"], servers["forbidden"]
    ls.routes["/data/upload/1/denied.png"] = Route(status)
    forbidden.routes["/denied.png"] = Route(status)
    keyed = servers["access"]
    for access, said in ((keyed, "to the backend's API key"), (ImageAccess(label_studio_url=ls.url), "no API key")):
        with pytest.raises(ImageAccessError, match=said) as e:
            read_image_bytes("/data/upload/1/denied.png", access)
        assert e.value.status == 404 and "LABEL_STUDIO_API_KEY" in e.value.message
        assert "test-key" not in e.value.message
    storage = ImageAccess(label_studio_url=ls.url, api_key="test-key", allowed_networks=("127.0.0.0/8",),
                          storage_hosts=(f"storage.test:{forbidden.port}",))
    with pytest.raises(ImageAccessError, match=f"answered HTTP {status}$"):
        read_image_bytes(f"http://storage.test:{forbidden.port}/denied.png", storage)


def test_a_named_storage_host_gets_redirects_without_the_key_and_only_at_checked_addresses(servers, net):
    forbidden, access = servers["forbidden"], servers["access"]
    from dataclasses import replace

    named = replace(access, storage_hosts=(f"storage.test:{forbidden.port}",))
    with pytest.raises(ImageAccessError, match="loopback, private"):  # storage hosts get no loopback by default
        read_image_bytes("/data/upload/1/to-storage.png", named)
    assert forbidden.hits == []
    allowed = replace(named, allowed_networks=("127.0.0.0/8",))
    net["lookups"].clear()
    assert read_image_bytes("/data/upload/1/to-storage.png", allowed) == PNG
    target, headers = forbidden.hits[-1]
    assert target == "/x.png" and "authorization" not in headers and headers["host"] == f"storage.test:{forbidden.port}"
    assert net["lookups"].count("storage.test") == 1  # resolved once, connected to that answer


@pytest.mark.parametrize("host", sorted(h for h in FAKE_DNS if h != "storage.test"))
def test_private_and_metadata_addresses_are_refused_before_any_connection(servers, net, host):
    from dataclasses import replace

    access = replace(servers["access"], storage_hosts=(host, f"{host}:8080"))
    for ref in (f"http://{host}/x.png", f"http://{host}:8080/latest/meta-data/"):
        with pytest.raises(ImageAccessError, match="resolves to"):
            read_image_bytes(ref, access)
    assert net["connects"] == []


def test_link_local_is_refused_even_for_the_label_studio_host(net):
    access = ImageAccess(label_studio_url="http://metadata.test:8080", api_key="k")
    with pytest.raises(ImageAccessError, match="link-local or cloud metadata"):
        read_image_bytes("/data/upload/1/x.png", access)
    assert net["connects"] == []


def test_downloads_are_bounded_in_bytes(servers, net):
    access = servers["access"]
    with pytest.raises(ImageAccessError, match="over the limit of 4096 bytes") as e:
        read_image_bytes("/data/upload/1/big.png", access)
    assert e.value.status == 413 and str(len(PNG) + 5000) in e.value.message  # refused by Content-Length
    with pytest.raises(ImageAccessError, match="over the limit of 4096 bytes"):
        read_image_bytes("/data/upload/1/big-unsized.png", access)


def test_cloud_uris_are_presigned_by_label_studio_per_task(servers, net):
    ls, access = servers["ls"], servers["access"]
    fileuri = base64.urlsafe_b64encode(b"s3://bucket/a.png").decode()
    ls.routes[f"/tasks/12/presign/?fileuri={fileuri}"] = Route(302, headers={"Location": "/data/upload/1/x.png"})
    assert read_image_bytes("s3://bucket/a.png", access, task_id=12) == PNG
    with pytest.raises(ImageAccessError, match="task has no id"):
        read_image_bytes("s3://bucket/a.png", access)


def test_local_files_stay_inside_the_allowed_roots(servers):
    root, access, tmp = servers["root"], servers["access"], servers["tmp"]
    assert read_image_bytes(str(root / "sub" / "a.png"), access) == PNG
    assert read_image_bytes(f"file://{root}/sub/a.png", access) == PNG
    assert read_image_bytes(f"file://localhost{root}/sub/a.png", access) == PNG
    assert read_image_bytes(str(root / "inside.png"), access) == PNG  # a symlink that stays inside
    for ref, message in [(str(root / "escape.png"), "outside the allowed roots"),
                         (str(root / "outdir" / "secret.txt"), "outside the allowed roots"),
                         (f"{root}/sub/../../secret.txt", "'..'"),
                         (str(tmp / "secret.txt"), "outside the allowed roots"),
                         (str(root), "outside the allowed roots"),
                         (str(root / "sub"), "not a regular file"),
                         (str(root / "fifo.png"), "not a regular file"),
                         (str(root / "missing.png"), "does not exist"),
                         ("sub/a.png", "not absolute"),
                         (f"file://otherhost{root}/sub/a.png", "only files on this machine"),
                         (f"file:{root}/sub/a.png", "file:///"),
                         (f"{root}/sub/a.png\x00.txt", "control characters")]:
        with pytest.raises(ImageAccessError, match=message) as e:
            read_image_bytes(ref, access)
        assert str(tmp) not in e.value.message.replace(ref, "")  # never names a resolved server path
    (root / "sub" / "big.png").write_bytes(PNG + b"\0" * 5000)
    with pytest.raises(ImageAccessError, match="over the limit"):
        read_image_bytes(str(root / "sub" / "big.png"), access)
    with pytest.raises(ImageAccessError, match="no local roots"):
        read_image_bytes(str(root / "sub" / "a.png"), ImageAccess())


def test_a_label_studio_served_under_a_base_path_is_reached_under_it():
    access = ImageAccess(label_studio_url="https://example.org/labels/", api_key="k")
    assert str(plan("/data/upload/3/a.png", access).url) == "https://example.org/labels/data/upload/3/a.png"
    assert plan("https://example.org/labels/data/upload/3/a.png", access).url.target == "/labels/data/upload/3/a.png"
    for ref in ("https://example.org/data/upload/3/a.png", "https://example.org/labels/api/projects"):
        with pytest.raises(ImageAccessError, match="not a Label Studio data path"):
            plan(ref, access)


def test_references_are_classified_without_io():
    access = ImageAccess(label_studio_url="http://ls.example:8080", allowed_roots=("/srv/images",))
    assert plan("/data/upload/3/a.png", access).url.target == "/data/upload/3/a.png"
    assert plan("storage-data/uploaded/?filepath=upload/3/a.png", access).url.target.startswith("/storage-data/")
    assert plan("/srv/images/a.png", access).kind == "local"
    for ref in ("", "data:image/png;base64,AAAA", "mailto:x@y", "C:\\images\\a.png", "\\\\server\\share\\a.png"):
        with pytest.raises(ImageAccessError):
            plan(ref, access)
