"""A tiny threaded HTTP server on 127.0.0.1 for image-access tests: fixed routes, every hit recorded.

Plays Label Studio (serving image bytes, redirects) or a host the backend must never reach (counting
hits). Started and stopped by the test that owns it, in this process.
"""
from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass, field


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes


class StubServer:
    """`routes` maps a request target (path + query) to a Route; anything else is a 404."""

    def __init__(self, routes: dict[str, Route] | None = None) -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.hits: list[tuple[str, dict[str, str]]] = []  # (target, headers) of every request
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                stub.hits.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                route = stub.routes.get(self.path, Route(404, b"not found"))
                self.send_response(route.status)
                for k, v in route.headers.items():
                    self.send_header(k, v)
                if route.send_length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                try:
                    self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: by design
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


def guard_network(mp, fake_dns: dict[str, str]) -> dict[str, list]:
    """Keep a test's sockets on this machine, and record what the code under test tried.

    Names in `fake_dns` resolve to their (private, metadata...) address without any DNS query; other
    names but `localhost` and IP literals fail to resolve. Every `socket.connect` is recorded, and one
    to a non-loopback address is refused before anything is sent. `mp` is a pytest MonkeyPatch.
    """
    import ipaddress
    import socket

    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    record: dict[str, list] = {"lookups": [], "connects": []}

    def getaddrinfo(host, port, *args, **kwargs):
        record["lookups"].append(host)
        if host in fake_dns:
            addr = fake_dns[host]
            if ":" in addr:
                return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (addr, port, 0, 0))]
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (addr, port))]
        try:
            ipaddress.ip_address(str(host))
        except ValueError:
            if host != "localhost":
                raise socket.gaierror(socket.EAI_NONAME, "test: no DNS") from None
        return real_getaddrinfo(host, port, *args, **kwargs)

    def connect(self, address):
        record["connects"].append((address[0], address[1]))
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise ConnectionRefusedError("test: no traffic leaves loopback")
        return real_connect(self, address)

    mp.setattr(socket, "getaddrinfo", getaddrinfo)
    mp.setattr(socket.socket, "connect", connect)
    return record
