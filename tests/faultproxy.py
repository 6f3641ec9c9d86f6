"""A fault-injecting HTTP proxy in front of the real S3 server (moto) on 127.0.0.1.

Clients use the proxy's URL as their S3 endpoint; every request is forwarded to moto unchanged
unless a rule matches it. Rules (checked in order, first match wins) are
``(method, path_regex, action, times)``: ``action`` is ``"error"`` (an S3 ``503 SlowDown``),
``"reset"`` (the connection is closed without an answer) or ``"hold"`` (the request waits until
:meth:`FaultProxy.release` or until the proxy stops: a write that never completes) or ``"slow"``
(forwarded after a random 0-300 ms, as an object store under load answers); ``times`` is
how many matching requests the rule applies to (None = all). The proxy counts what it did.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str):
        host, port = upstream.split("://", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.rules: list[list] = []
        self.counts: dict[str, int] = {"forwarded": 0, "error": 0, "reset": 0, "hold": 0, "slow": 0}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request received
        self.seen: list[tuple[str, str]] = []
        self.held = threading.Event()  # set when a request is being held
        self._release = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                action = proxy._match(self.command, self.path)
                if action == "reset":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action == "hold":
                    proxy.held.set()
                    proxy._release.wait()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action == "error":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if action == "slow":
                    time.sleep(random.uniform(0, 0.3))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP | {"expect"}}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    head = self.command == "HEAD"  # its Content-Length is the object's, no body
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and (head or k.lower() != "content-length"):
                            self.send_header(k, v)
                    if not head:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _match(self, method: str, path: str) -> str | None:
        with self._lock:
            self.seen.append((method, path))
            for rule in self.rules:
                m, pattern, action, times = rule
                if m == method and re.search(pattern, path) and (times is None or times > 0):
                    if times is not None:
                        rule[3] = times - 1
                    self.counts[action] += 1
                    return action
            self.counts["forwarded"] += 1
            return None

    def add_rule(self, method: str, pattern: str, action: str, times: int | None = None) -> None:
        assert action in ("error", "reset", "hold", "slow")
        with self._lock:
            self.rules.append([method, pattern, action, times])

    def reset(self) -> None:
        """No rules; held requests are let go (their connections closed); ready to hold again."""
        with self._lock:
            self.rules.clear()
            released, self._release = self._release, threading.Event()
            self.held.clear()
        released.set()

    def release(self) -> None:
        self._release.set()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
