"""Reading a task's image bytes from the places an operator allowed, and from nowhere else.

A task's image reference (Label Studio task data, written by whoever can create tasks) is untrusted.
It may name:

- a Label Studio path (`/data/upload/...`, `/data/local-files/?d=...`, `/storage-data/...`,
  `/tasks/<id>/presign/...`), or an absolute `http(s)` URL on the configured Label Studio origin:
  fetched from that server with its API key;
- a cloud URI (`s3://`, `gs://`, `azure-blob://`): Label Studio presigns it (`/tasks/<id>/presign/`)
  and redirects to the storage host, which must be one the operator named (`storage_hosts`);
- an `http(s)` URL on a named storage host (fetched without the API key);
- a file under an allowed local root (an absolute path or a `file://` URL).

One strict parse decides everything: the URL is split once (`parse_http_url`), refused outright when it
is not in canonical form (userinfo, backslashes, control characters, odd schemes, numeric-shorthand or
percent-encoded hosts, non-canonical ports, dot segments), and the connection is made from that same
parsed value, never re-parsed by an HTTP library. Every host name is resolved once, each address is
checked, and the socket connects to the checked address (no DNS rebinding between check and use).
Link-local, metadata, unspecified and multicast addresses are refused; loopback and private addresses
only for the Label Studio server the operator configured, or inside networks named in
`allowed_networks`. Redirects are followed by hand, each target checked like the first. Downloads are
refused by Content-Length before reading and streamed with a byte limit otherwise; local files are
opened without following a final symlink and checked to be regular files inside a root after opening.

Error messages say what is wrong with the reference; they never quote fetched content or server paths.
"""
from __future__ import annotations

import argparse
import base64
import errno
import http.client
import ipaddress
import os
import re
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import quote, unquote, urljoin

from interformer.cli_types import POSITIVE

DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
MAX_REF_CHARS = 4096
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
LS_PATH_PATTERN = re.compile(r"^/(data/|storage-data/|tasks/[0-9]+/presign/)")
# Addresses of cloud metadata services beyond 169.254.0.0/16 (AWS IPv6, Alibaba, Oracle, Azure's wire
# server): always refused, like link-local ones, whatever --allow-network says.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "fd00:ec2::254", "100.100.100.200", "192.0.0.192", "168.63.129.16"))
# Networks refused whatever --allow-network says, with the reason given.
_ALWAYS_REFUSED = tuple((ipaddress.ip_network(net), why) for net, why in (
    ("0.0.0.0/8", "an unspecified or multicast address"),  # "this network": 0.0.0.0 reaches this machine
    ("::/128", "an unspecified or multicast address"),
    ("224.0.0.0/4", "an unspecified or multicast address"),
    ("ff00::/8", "an unspecified or multicast address"),
    ("169.254.0.0/16", "a link-local or cloud metadata address"),
    ("fe80::/10", "a link-local or cloud metadata address"),
    ("192.0.0.0/24", "a link-local or cloud metadata address"),  # IETF protocol assignments (Oracle metadata)
    ("240.0.0.0/4", "a reserved, site-local or untranslatable address"),  # reserved and broadcast
    ("fec0::/10", "a reserved, site-local or untranslatable address"),  # site-local (deprecated)
    ("64:ff9b:1::/48", "a reserved, site-local or untranslatable address"),  # local-use NAT64 (RFC 8215)
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known IPv4/IPv6 translation prefix (RFC 6052)
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # IPv4-translated (SIIT, RFC 2765)
_COMPATIBLE = ipaddress.ip_network("::/96")  # IPv4-compatible (deprecated), besides :: and ::1
_DIGITS = re.compile(r"[0-9]{1,19}")

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"^{_OCTET}(\.{_OCTET}){{3}}$")
_PORT = re.compile(r"^[1-9][0-9]{0,4}$")
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


class ImageAccessError(Exception):
    """The image of a task may not be, or could not be, read; `status` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __reduce__(self):  # keep the fields when the error crosses a process boundary (Ray)
        return (type(self), (self.message, self.status))


@dataclass(frozen=True)
class HttpURL:
    """An http(s) URL in canonical form; the only form a connection is ever made from."""

    scheme: str  # "http" or "https"
    host: str  # lower-case DNS name, dotted-quad IPv4 or compressed IPv6 (no brackets)
    port: int
    target: str  # path and query, percent-encoded, starting with "/"

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return f"{self.scheme}://{host}{'' if self.port == default else f':{self.port}'}{self.target}"


@dataclass(frozen=True)
class ImageAccess:
    """Where images may be read from; set by the operator (command line, environment), never by a request."""

    label_studio_url: str | None = None
    api_key: str | None = field(default=None, repr=False)  # never in logs or reprs
    allowed_roots: tuple[str, ...] = ()
    storage_hosts: tuple[str, ...] = ()  # "host" or "host:port" Label Studio may redirect to, or tasks name
    allowed_networks: tuple[str, ...] = ()  # CIDRs whose non-public addresses may be connected to
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.label_studio_url is not None:
            parse_http_url(self.label_studio_url.rstrip("/") + "/", what="LABEL_STUDIO_URL")
        for host in self.storage_hosts:
            _parse_host_port(host, "https")
        for net in self.allowed_networks:
            ipaddress.ip_network(net, strict=False)
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be positive, got {self.max_image_bytes}")

    @classmethod
    def from_env(cls, allowed_roots: Sequence[str] = (), **options) -> "ImageAccess":
        """Label Studio URL and key from LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY (as label-studio-sdk reads them)."""
        url = os.environ.get("LABEL_STUDIO_URL") or os.environ.get("LABEL_STUDIO_HOST") or None
        key = os.environ.get("LABEL_STUDIO_API_KEY") or os.environ.get("LABEL_STUDIO_ACCESS_TOKEN") or None
        roots = tuple(os.path.realpath(r) for r in allowed_roots)
        return cls(url.rstrip("/") if url else None, key, roots, **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ImageAccess":
        """From the options `add_image_access_arguments` defines (plus the Label Studio environment)."""
        return cls.from_env(tuple(args.allowed_root), storage_hosts=tuple(args.storage_host),
                            allowed_networks=tuple(args.allow_network),
                            max_image_bytes=int(args.max_image_mb * 1024 * 1024))

    @property
    def label_studio(self) -> HttpURL | None:
        return parse_http_url(self.label_studio_url.rstrip("/") + "/") if self.label_studio_url else None


def add_image_access_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say where images may be read from (one definition for every command)."""
    parser.add_argument("--allowed-root", action="append", default=[], metavar="DIR",
                        help="local folder tasks' image paths may point into (repeatable); others are refused")
    parser.add_argument("--storage-host", action="append", default=[], metavar="HOST[:PORT]",
                        help="object-storage host Label Studio may redirect image downloads to (presigned "
                        "s3/gs/azure URLs), or tasks may name directly (repeatable); others are refused")
    parser.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                        help="private network a storage host may resolve into (repeatable); loopback, private, "
                        "link-local and metadata addresses are otherwise refused for every host but the "
                        "Label Studio server")
    parser.add_argument("--max-image-mb", type=POSITIVE, default=DEFAULT_MAX_IMAGE_BYTES / 2**20,
                        help="largest image file read or downloaded, in MiB; refused by Content-Length "
                        "before reading (default: %(default)s)")


# --------------------------------------------------------------------------------------------------
# Parsing


def _refuse(what: str, why: str) -> ImageAccessError:
    return ImageAccessError(f"{what} refused: {why}")


def _check_chars(text: str, what: str) -> None:
    if len(text) > MAX_REF_CHARS:
        raise _refuse(what, f"longer than {MAX_REF_CHARS} characters")
    if any((ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or ch in "\u2028\u2029") for ch in text):
        raise _refuse(what, "it contains control characters")
    if "\\" in text:
        raise _refuse(what, "it contains a backslash")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        raise _refuse(what, "it is not valid Unicode")


def _canonical_host(text: str, what: str) -> str:
    if text.startswith("["):
        if not text.endswith("]") or "%" in text:
            raise _refuse(what, "the IPv6 host is malformed (zone ids are not accepted)")
        try:
            return ipaddress.IPv6Address(text[1:-1]).compressed
        except ValueError:
            raise _refuse(what, "the IPv6 host is malformed") from None
    host = text.lower()
    if _IPV4.match(host):
        return host
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise _refuse(what, "the host is not a plain DNS name or IP address")
    if labels[-1].isdigit() or _is_numeric_shorthand(host):
        raise _refuse(what, "the host is a non-canonical IP address")
    return host


def _is_numeric_shorthand(host: str) -> bool:
    """True for hosts a resolver reads as an IPv4 address in shorthand (127.1, 0x7f.1, 2130706433, 017...)."""
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        return False


def _parse_host_port(authority: str, scheme: str, what: str = "storage host") -> tuple[str, int]:
    if "@" in authority:
        raise _refuse(what, "it contains user information ('@')")
    if authority.startswith("["):
        close = authority.find("]")
        host_text, rest = authority[: close + 1], authority[close + 1:]
        if close < 0 or (rest and not rest.startswith(":")):
            raise _refuse(what, "the IPv6 host is malformed")
        port_text = rest[1:] if rest else None
    else:
        host_text, sep, port_text = authority.partition(":")
        port_text = port_text if sep else None
    if port_text is not None and (not _PORT.match(port_text) or int(port_text) > 65535):
        raise _refuse(what, "the port is not a number from 1 to 65535 without leading zeros")
    port = int(port_text) if port_text is not None else (443 if scheme == "https" else 80)
    return _canonical_host(host_text, what), port


def _normalise_target(path: str, query: str | None, what: str) -> str:
    """Percent-encode what needs it and refuse dot segments, in the path and in every query value."""
    if _PCT.search(path) or (query and _PCT.search(query)):
        raise _refuse(what, "it has a malformed percent escape")
    segments = unquote(path).split("/")
    if any(s in (".", "..") for s in segments) or "//" in path or "\\" in unquote(path):
        raise _refuse(what, "its path has '.' or '..' segments or empty segments")
    target = quote(path, safe=_PATH_SAFE)
    if query:
        for part in query.split("&"):
            value = unquote(part.partition("=")[2].replace("+", " "))
            if any(s == ".." for s in value.split("/")) or "\\" in value or "\x00" in value:
                raise _refuse(what, "a query value has '..' segments, backslashes or NUL")
        target += "?" + quote(query, safe=_QUERY_SAFE)
    return target


def parse_http_url(text: str, what: str = "image URL") -> HttpURL:
    """Split an http(s) URL once, strictly; refuse anything not in plain canonical form."""
    if not isinstance(text, str):
        raise _refuse(what, "it is not a string")
    _check_chars(text, what)
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        raise _refuse(what, "only http and https URLs are fetched")
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, remainder = rest[:end], rest[end:]
    if not authority:
        raise _refuse(what, "it has no host")
    if "%" in authority:
        raise _refuse(what, "the host is percent-encoded")
    if any(ord(ch) > 0x7E for ch in authority):
        raise _refuse(what, "the host is not ASCII (use its punycode form)")
    host, port = _parse_host_port(authority, scheme, what)
    remainder = remainder.partition("#")[0]
    path, qsep, query = remainder.partition("?")
    if not path:
        path = "/"
    if not path.startswith("/"):
        raise _refuse(what, "its path does not start with '/'")
    return HttpURL(scheme, host, port, _normalise_target(path, query if qsep else None, what))


# --------------------------------------------------------------------------------------------------
# Where a reference points


@dataclass(frozen=True)
class _Plan:
    kind: str  # "http" or "local"
    url: HttpURL | None = None
    path: str | None = None


def plan(ref: str, access: ImageAccess, task_id: int | None = None) -> _Plan:
    """Decide, without any I/O, what reading `ref` would do; raise ImageAccessError if it is not allowed."""
    if not isinstance(ref, str) or not ref.strip():
        raise ImageAccessError("the task has no image reference")
    _check_chars(ref, "image reference")
    head = ref.split(":", 1)[0].lower() if ":" in ref.split("/", 1)[0] else ""
    if head in ("http", "https"):
        url = parse_http_url(ref)
        ls = access.label_studio
        if ls is not None and url.origin == ls.origin:
            return _Plan("http", _label_studio_data_path(url, ls))
        if _storage_host_allowed(url, access):
            return _Plan("http", url)
        raise _refuse("image URL", "its host is neither the configured Label Studio server nor an allowed "
                                   "storage host (--storage-host)")
    if head in CLOUD_SCHEMES:
        if task_id is None or isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0:
            raise _refuse("cloud storage URI", "Label Studio presigns it per task, and the task has no id")
        fileuri = base64.urlsafe_b64encode(ref.encode("utf-8")).decode("ascii")
        return _Plan("http", _label_studio_url(access, f"/tasks/{task_id}/presign/?fileuri={fileuri}"))
    if head == "file":
        return _Plan("local", path=_file_url_path(ref))
    if head:
        raise _refuse("image reference", f"scheme {head!r} is not one of http, https, file, "
                                         f"{', '.join(CLOUD_SCHEMES)}")
    if ref.startswith(("upload/", "/upload/")):
        return _Plan("http", _label_studio_url(access, "/data/" + ref.lstrip("/")))
    if ref.startswith(("data/", "storage-data/")):
        return _Plan("http", _label_studio_url(access, "/" + ref))
    if LS_PATH_PATTERN.match(ref):
        return _Plan("http", _label_studio_url(access, ref))
    if ref.startswith("//"):
        raise _refuse("image reference", "a network path (//host/...) is not a file or a Label Studio path")
    return _Plan("local", path=ref)


def _label_studio_url(access: ImageAccess, target: str) -> HttpURL:
    """A Label Studio path (`/data/...`) on the configured server, under its base path if it has one."""
    ls = access.label_studio
    if ls is None:
        raise ImageAccessError("the image is a Label Studio path, but LABEL_STUDIO_URL is not set")
    if not target.startswith("/") or target.startswith("//"):
        raise _refuse("image reference", "it is not a Label Studio path")
    host = f"[{ls.host}]" if ":" in ls.host else ls.host
    url = parse_http_url(f"{ls.scheme}://{host}:{ls.port}{_base_path(ls)}{target}", what="image reference")
    if url.origin != ls.origin:
        raise _refuse("image reference", "it is not a Label Studio path")
    return _label_studio_data_path(url, ls)


def _base_path(ls: HttpURL) -> str:
    """The path Label Studio is served under ('' at the root), from LABEL_STUDIO_URL."""
    return ls.target.partition("?")[0].rstrip("/")


def _label_studio_data_path(url: HttpURL, ls: HttpURL, what: str = "image reference") -> HttpURL:
    """`url` if it names Label Studio data (never its API), with relative query values (`?d=`, `filepath=`)."""
    base = _base_path(ls)
    if not url.target.startswith(base + "/") or not LS_PATH_PATTERN.match(url.target[len(base):]):
        raise _refuse(what, "it is not a Label Studio data path (/data/, /storage-data/)")
    query = url.target.partition("?")[2]
    if any(unquote(part.partition("=")[2]).startswith("/") for part in query.split("&") if part):
        raise _refuse(what, "a Label Studio data path must be relative to its storage root")
    return url


def _storage_host_allowed(url: HttpURL, access: ImageAccess) -> bool:
    for entry in access.storage_hosts:
        host, port = _parse_host_port(entry, url.scheme)
        explicit_port = ":" in entry.rsplit("]", 1)[-1]
        if host == url.host and (port == url.port if explicit_port else url.port == (443 if url.scheme == "https"
                                                                                   else 80)):
            return True
    return False


def _file_url_path(ref: str) -> str:
    rest = ref.split(":", 1)[1]
    if not rest.startswith("//"):
        raise _refuse("file URL", "write it as file:///absolute/path")
    authority, slash, path = rest[2:].partition("/")
    if authority not in ("", "localhost") or not slash:
        raise _refuse("file URL", "only files on this machine (file:///path) are read")
    if "?" in path or "#" in path or _PCT.search(path):
        raise _refuse("file URL", "it has a query, a fragment or a malformed percent escape")
    decoded = unquote("/" + path)
    _check_chars(decoded, "file URL")  # what %00, %0a... decode to is checked like the reference itself
    return decoded


# --------------------------------------------------------------------------------------------------
# Addresses


def effective_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a connection to `address` really reaches: the IPv4 address inside an IPv6 form that embeds
    one (IPv4-mapped, -translated, -compatible, NAT64 64:ff9b::/96, 6to4, Teredo's client), else itself."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not isinstance(ip, ipaddress.IPv6Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or ip in _TRANSLATED or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def _always_refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `ip` is refused for every host and every --allow-network setting, or None."""
    if ip.is_unspecified or ip.is_multicast:
        return "an unspecified or multicast address"
    if ip.is_link_local or ip in METADATA_ADDRESSES:
        return "a link-local or cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a reserved, site-local or untranslatable address"
    return next((why for net, why in _ALWAYS_REFUSED if ip in net), None)


def address_refusal(address: str, trusted: bool, access: ImageAccess) -> str | None:
    """Why a connection to `address` is refused, or None. `trusted`: the operator's Label Studio host.

    Unspecified, multicast, link-local, metadata, site-local and reserved addresses are refused first,
    unconditionally, in every IPv4 and IPv6 spelling; `--allow-network` only opens loopback and private
    addresses, and is matched against the address a connection really reaches."""
    ip = effective_address(address)
    why = _always_refused(ip)
    if why is not None:
        return why
    if ip.is_global or trusted:
        return None
    if any(ip in ipaddress.ip_network(net, strict=False) for net in access.allowed_networks):
        return None
    return "a loopback, private or reserved address (allow its network with --allow-network)"


def resolve_checked(url: HttpURL, access: ImageAccess, deadline: float | None = None) -> list[str]:
    """Resolve the host once, by `deadline` (time.monotonic(); default: the access's timeout from now), and
    return the addresses that may be connected to (all of them pass)."""
    ls = access.label_studio
    trusted = ls is not None and url.origin == ls.origin
    if deadline is None:
        deadline = time.monotonic() + access.timeout_s
    try:
        infos = resolve_by(url.host, url.port, deadline)
    except (socket.gaierror, UnicodeError):
        raise ImageAccessError(f"image host {url.host} could not be resolved", 502) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        why = address_refusal(address, trusted, access)
        if why is not None:
            raise ImageAccessError(f"image host {url.host} resolves to {why}; refused", 403)
    if not addresses:
        raise ImageAccessError(f"image host {url.host} could not be resolved", 502)
    return addresses


def resolve_by(host: str, port: int, deadline: float) -> list:
    """`socket.getaddrinfo` for a TCP connection to (host, port), waiting at most until `deadline`.

    The system resolver has no timeout of its own (it may take resolv.conf's timeout times its attempts per
    name server), so the lookup runs in a daemon thread: when the deadline passes first the download fails
    with 504, and the thread ends, its answer unused, whenever the resolver gives up."""
    answer: dict[str, object] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            answer["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except BaseException as e:  # handed to the caller
            answer["error"] = e
        finally:
            done.set()

    threading.Thread(target=lookup, name=f"resolve {host}", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise ImageAccessError(f"the image download took too long (resolving {host})", 504)
    if "error" in answer:
        raise answer["error"]
    return answer["infos"]


# --------------------------------------------------------------------------------------------------
# HTTP, from the parsed URL only


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to a checked address, sending the URL's host name in the Host header. `opened` keeps
    its socket (http.client drops `sock` once the response owns it) for the deadline watchdog."""

    opened: socket.socket | None = None

    def __init__(self, url: HttpURL, address: str, timeout: float) -> None:
        super().__init__(url.host, url.port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = self.opened = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    opened: socket.socket | None = None

    def __init__(self, url: HttpURL, address: str, timeout: float) -> None:
        super().__init__(url.host, url.port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self.opened = self._context.wrap_socket(sock, server_hostname=self.host)


class _Watchdog:
    """Shuts a connection's socket down at the download deadline. The socket timeout bounds each recv only, so
    a host that trickles its status line and headers (http.client reads up to 100 header lines of 64 KiB) or its
    body one byte at a time would otherwise hold the download for many times the deadline."""

    def __init__(self, conn: _PinnedHTTP | _PinnedHTTPS, deadline: float) -> None:
        self._conn = conn
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._cut)
        self._timer.daemon = True
        self._timer.start()

    def _cut(self) -> None:
        sock = self._conn.opened
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

    def cancel(self) -> None:
        self._timer.cancel()


def _open(url: HttpURL, address: str, headers: dict[str, str], deadline: float):
    """(connection, response headers read, its watchdog): connect, send and read the headers by `deadline`."""
    cls = _PinnedHTTPS if url.scheme == "https" else _PinnedHTTP
    conn = cls(url, address, max(0.1, deadline - time.monotonic()))
    watchdog = _Watchdog(conn, deadline)
    try:
        conn.request("GET", url.target, headers=headers)
        return conn, conn.getresponse(), watchdog
    except BaseException:
        watchdog.cancel()
        conn.close()
        raise


def _past(deadline: float) -> None:
    if time.monotonic() >= deadline:
        raise ImageAccessError("the image download took too long", 504)


def _read_limited(response, limit: int, deadline: float) -> bytes:
    declared = response.getheader("Content-Length")
    if declared is not None:
        if not _DIGITS.fullmatch(declared.strip()):  # ASCII digits only: "²".isdigit() is True
            raise ImageAccessError("the image download declares an invalid Content-Length", 502)
        if int(declared) > limit:
            raise ImageAccessError(f"the image is {int(declared)} bytes, over the limit of {limit} bytes", 413)
    chunks, size = [], 0
    while True:
        chunk = response.read1(64 * 1024) if hasattr(response, "read1") else response.read(64 * 1024)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise ImageAccessError(f"the image is over the limit of {limit} bytes", 413)
        _past(deadline)
        chunks.append(chunk)
    _past(deadline)  # the watchdog ends a read at the deadline: what came is not the whole image
    return b"".join(chunks)


def _hop(url: HttpURL, access: ImageAccess, what: str) -> tuple[HttpURL, bool]:
    """Check one URL of a download (the first or a redirect's target); True when it gets the API key.

    Every hop on the Label Studio origin must be a data path, as the first one is, and only those get the
    key: a redirect to Label Studio's API is refused, whoever sends it."""
    ls = access.label_studio
    if ls is not None and url.origin == ls.origin:
        return _label_studio_data_path(url, ls, what), True
    if _storage_host_allowed(url, access):
        return url, False
    raise _refuse(what, f"{url.host} is neither the Label Studio server nor an allowed storage host (--storage-host)")


def _redirect_target(url: HttpURL, location: str | None) -> HttpURL:
    """The URL a Location header names, relative to `url`; ImageAccessError for anything malformed."""
    if not location:
        raise ImageAccessError("the image host redirected without a Location", 502)
    _check_chars(location, "redirect")
    try:
        joined = urljoin(str(url), location.strip())
    except ValueError:  # e.g. "http://[::1/x": urljoin splits it and refuses the bracket
        raise _refuse("redirect", "its Location is not a valid URL") from None
    return parse_http_url(joined, what="redirect")


# What a hostile host or a broken connection can make the standard library raise while fetching.
_FETCH_FAULTS = (OSError, http.client.HTTPException, ValueError, UnicodeError)


def http_get(url: HttpURL, access: ImageAccess) -> bytes:
    """GET `url` (following allowed redirects by hand, each hop checked) into memory, within the byte limit."""
    deadline = time.monotonic() + access.timeout_s
    what = "image URL"
    for _ in range(MAX_REDIRECTS + 1):
        url, with_key = _hop(url, access, what)
        headers = {"User-Agent": "interformer-ml-backend", "Accept": "*/*", "Connection": "close"}
        if with_key and access.api_key:
            headers["Authorization"] = f"Token {access.api_key}"
        addresses = resolve_checked(url, access, deadline)
        response = conn = watchdog = None
        for address in addresses:
            try:
                conn, response, watchdog = _open(url, address, headers, deadline)
                break
            except _FETCH_FAULTS as e:
                _past(deadline)
                last = e
        if response is None:
            raise ImageAccessError(f"could not connect to image host {url.host} ({_os_reason(last)})", 502)
        try:
            if response.status in (301, 302, 303, 307, 308):
                url, what = _redirect_target(url, response.getheader("Location")), "redirect"
                continue
            if response.status in (401, 403) and with_key:
                raise ImageAccessError(_key_refused(response.status, access), 404)
            if response.status != 200:
                raise ImageAccessError(f"the image host answered HTTP {response.status}",
                                       404 if response.status in (401, 403, 404, 410) else 502)
            return _read_limited(response, access.max_image_bytes, deadline)
        except _FETCH_FAULTS as e:
            _past(deadline)
            raise ImageAccessError(f"the image download from {url.host} failed ({_os_reason(e)})", 502) from None
        finally:
            watchdog.cancel()
            conn.close()
    raise ImageAccessError(f"the image host redirected more than {MAX_REDIRECTS} times", 502)


def _key_refused(status: int, access: ImageAccess) -> str:
    """Why Label Studio refused a data path: almost always the backend's own API key, which an annotator cannot
    fix and an operator should read in the log (the key itself is never quoted)."""
    if not access.api_key:
        return (f"Label Studio answered HTTP {status}: the backend has no API key; set LABEL_STUDIO_API_KEY to the "
                "token of a user who can read this project")
    return (f"Label Studio answered HTTP {status} to the backend's API key: LABEL_STUDIO_API_KEY is wrong, expired "
            "or lacks access to this project")


def _os_reason(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.errno is not None:
        return errno.errorcode.get(e.errno, "error").lower()
    return type(e).__name__


# --------------------------------------------------------------------------------------------------
# Local files


def read_local_file(path: str, access: ImageAccess) -> bytes:
    """Bytes of a regular file inside an allowed root; symlinks may not lead outside a root."""
    if not access.allowed_roots:
        raise ImageAccessError("local image paths are refused: no local roots are allowed (--allowed-root)")
    _check_chars(path, "local image path")
    if not path.startswith("/"):
        raise _refuse("local image path", "it is not absolute")
    if any(s == ".." for s in path.split("/")):
        raise _refuse("local image path", "it has '..' segments")
    real = os.path.realpath(path)
    if _root_of(real, access) is None:
        raise _refuse("local image path", "it is outside the allowed roots")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise ImageAccessError("local image does not exist") from None
    except OSError:
        raise ImageAccessError("local image cannot be opened") from None
    try:
        opened = os.path.realpath(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else real
        st = os.fstat(fd)
        if _root_of(opened, access) is None:  # a folder on the way was swapped for a symlink meanwhile
            raise _refuse("local image path", "it is outside the allowed roots")
        if not stat.S_ISREG(st.st_mode):
            raise ImageAccessError("local image is not a regular file")
        if st.st_size > access.max_image_bytes:
            raise ImageAccessError(f"local image is {st.st_size} bytes, over the limit of "
                                   f"{access.max_image_bytes} bytes", 413)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(access.max_image_bytes + 1)
        if len(data) > access.max_image_bytes:
            raise ImageAccessError(f"local image is over the limit of {access.max_image_bytes} bytes", 413)
        return data
    finally:
        os.close(fd)


def _root_of(real: str, access: ImageAccess) -> str | None:
    for root in access.allowed_roots:
        root = os.path.realpath(root)
        if real != root and os.path.commonpath([real, root]) == root:
            return root
    return None


def read_image_bytes(ref: str, access: ImageAccess, task_id: int | None = None) -> bytes:
    """The bytes of the image `ref` points at, read only from the sources `access` allows.

    Raises ImageAccessError and nothing else: the reference and whatever a host answers are untrusted, so any
    other failure on the way is reported as an unreadable image (by its type only), never as a server fault."""
    try:
        p = plan(ref, access, task_id)
        if p.kind == "local":
            return read_local_file(p.path, access)
        return http_get(p.url, access)
    except ImageAccessError:
        raise
    except Exception as e:  # a fault class no check above anticipated: still the image's, not the server's
        raise ImageAccessError(f"the image could not be read ({type(e).__name__})", 502) from None
