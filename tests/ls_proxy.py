"""A loopback proxy in front of the test Label Studio that misbehaves on the requests a test picks.

`rule(method, path)` decides, before anything is forwarded: None (forward, the real answer),
("refuse", code, headers) (answered without forwarding: a 401, a rate limiter's 429), or, after forwarding, so
that Label Studio has committed the request: ("after", code, headers) (a gateway's answer, e.g. a 502),
"drop" (the connection closed without an answer) or "hold" (no answer until the test sets `release`, so a
client with a short timeout gives up first). Started and stopped by the test that owns
it, in this process; `log` lists (method, path, status sent) of every request.
"""
from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request
from typing import Callable


class LabelStudioProxy:
    def __init__(self, upstream: str, rule: Callable[[str, str], object] = lambda m, p: None,
                 before: Callable[[str, str], None] | None = None) -> None:
        self.upstream, self.rule, self.before = upstream.rstrip("/"), rule, before
        self.log: list[tuple[str, str, object]] = []
        self.release = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                if proxy.before is not None:
                    proxy.before(self.command, self.path)
                action = proxy.rule(self.command, self.path)
                if isinstance(action, tuple) and action[0] == "refuse":
                    return self._answer(action[1], b'{"detail": "from the proxy"}', "application/json", action[2])
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection", "accept-encoding")}
                request = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command,
                                                 headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as r:
                        status, data, ctype = r.status, r.read(), r.headers.get("Content-Type", "application/json")
                except urllib.error.HTTPError as e:
                    status, data, ctype = e.code, e.read(), e.headers.get("Content-Type", "application/json")
                if action == "drop":
                    proxy.log.append((self.command, self.path, "drop"))
                    self.close_connection = True
                    self.connection.close()
                    return
                if action == "hold":
                    proxy.log.append((self.command, self.path, "hold"))
                    proxy.release.wait(60)
                    self.close_connection = True
                    return
                if isinstance(action, tuple):
                    return self._answer(action[1], b'{"detail": "from the proxy"}', "application/json", action[2])
                self._answer(status, data, ctype, {})

            def _answer(self, status: int, data: bytes, ctype: str, extra: dict[str, str]) -> None:
                proxy.log.append((self.command, self.path, status))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def posts(self, fragment: str) -> list[tuple[str, str, object]]:
        return [entry for entry in self.log if entry[0] == "POST" and fragment in entry[1]]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
