"""A fault-injecting HTTP proxy in front of the real Swift proxy server, for tests.

Real Swift cannot answer 503 or stall on demand; this proxy can, for the requests a rule
matches, and forwards everything else unchanged to Swift (127.0.0.1:8080)::

    with SwiftProxy() as proxy:                     # or the ``swift_proxy`` fixture
        proxy.fail(503, times=1, method="PUT", path="manifest.json")
        proxy.fail(429, times=2, retry_after=3)
        proxy.stall(times=None)                      # accept, read, never answer
        proxy.stall(seconds=5, times=1)              # answer 5 s late
        proxy.reset(after=4096, method="GET")        # forward, then RST after 4 KiB of body
        settings = replace(settings, storage_url=proxy.storage_url(real_storage_url))
        ...
        proxy.count(method="PUT", path="manifest.json")   # requests seen (faulted or not)
        proxy.log                                          # every request, in order

A rule matches on ``method`` (exact) and ``path`` (a substring of the unquoted path; a
compiled regex also works); ``times=None`` applies it to every match until :meth:`clear`.
Rules are tried in the order they were added; the first that matches and has uses left acts.
Request bodies are read in full before a fault is answered (the client sees the status, not
a broken pipe), so keep bodies small (segments of a few MiB).

The ``swift_proxy`` fixture (``from swift_proxy import swift_proxy_fixture`` in conftest or a
test module) yields a started proxy whose ``account_url`` is the Swift storage URL of the
test account through the proxy (set it as OS_STORAGE_URL or SwiftSettings.storage_url); it
needs the ``os_env`` fixture.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit, urlunsplit

import pytest

UPSTREAM = "http://127.0.0.1:8080"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection"}


@dataclass
class Rule:
    """What to do to matching requests: ``fail`` (answer ``status``), ``stall`` (answer after
    ``seconds``, or never), or ``reset`` (close with RST after ``after`` bytes of body)."""

    action: str
    method: str | None = None
    path: str | re.Pattern | None = None
    times: int | None = 1
    status: int = 503
    retry_after: str | None = None
    seconds: float | None = None
    after: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method and self.method != method:
            return False
        if isinstance(self.path, re.Pattern):
            return bool(self.path.search(path))
        return self.path is None or self.path in path


@dataclass
class Seen:
    """One request the proxy received."""

    method: str
    path: str
    query: str
    fault: str | None
    at: float  # time.monotonic()


class SwiftProxy:
    """The proxy; thread-safe; start/stop it or use it as a context manager."""

    def __init__(self, upstream: str = UPSTREAM) -> None:
        self.upstream = urlsplit(upstream)
        self.rules: list[Rule] = []
        self.log: list[Seen] = []
        self.account_url: str = ""  # set by the fixture: the test account through the proxy
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()  # open client connections
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._server.stopping = self._stopping
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="swift-proxy")

    @property
    def url(self) -> str:
        """The proxy's base URL, e.g. http://127.0.0.1:41234."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def storage_url(self, real: str) -> str:
        """``real`` (Swift's storage URL, with the account path) through this proxy."""
        parts = urlsplit(real)
        return urlunsplit(urlsplit(self.url)._replace(path=parts.path, query=parts.query))

    def start(self) -> SwiftProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop as a Swift proxy server that goes away: new connections are refused and the
        open ones are cut, requests in flight included (a client's keep-alive connection
        would otherwise go on being forwarded)."""
        self._stopping.set()  # releases stalled handlers
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            live = list(self._connections)
        for connection in live:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed meanwhile

    def __enter__(self) -> SwiftProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------- rules
    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail(self, status: int, times: int | None = 1, *, method: str | None = None,
             path: str | re.Pattern | None = None, retry_after: str | float | None = None
             ) -> Rule:
        """Answer ``status`` (with ``Retry-After`` if given) instead of forwarding."""
        return self.add(Rule("fail", method, path, times, status=status,
                             retry_after=None if retry_after is None else str(retry_after)))

    def stall(self, seconds: float | None = None, times: int | None = 1, *,
              method: str | None = None, path: str | re.Pattern | None = None) -> Rule:
        """Read the request and say nothing for ``seconds`` (then forward), or ever."""
        return self.add(Rule("stall", method, path, times, seconds=seconds))

    def reset(self, after: int = 0, times: int | None = 1, *, method: str | None = None,
              path: str | re.Pattern | None = None) -> Rule:
        """Forward, send the headers and ``after`` bytes of the body, then reset (RST)."""
        return self.add(Rule("reset", method, path, times, after=after))

    def clear(self) -> None:
        """Drop every rule (the log stays)."""
        with self._lock:
            self.rules.clear()

    def count(self, *, method: str | None = None, path: str | None = None,
              fault: str | None = None) -> int:
        """Requests seen that match (``fault``: "fail", "stall", "reset", or "" for none)."""
        with self._lock:
            return sum(1 for s in self.log
                       if (method is None or s.method == method)
                       and (path is None or path in s.path)
                       and (fault is None or (s.fault or "") == fault))

    def _take(self, method: str, path: str, query: str) -> Rule | None:
        with self._lock:
            rule = next((r for r in self.rules if r.matches(method, path)), None)
            if rule is not None and rule.times is not None:
                rule.times -= 1
            self.log.append(Seen(method, path, query, rule.action if rule else None,
                                 time.monotonic()))
            return rule


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stopping: threading.Event

    def handle_error(self, request: object, client_address: object) -> None:
        if not self.stopping.is_set():  # a cut connection is what stop() is for
            super().handle_error(request, client_address)


def _handler_for(proxy: SwiftProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.proxy = proxy
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: SwiftProxy

    def log_message(self, *_args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.proxy._lock:
            self.proxy._connections.add(self.connection)

    def finish(self) -> None:
        with self.proxy._lock:
            self.proxy._connections.discard(self.connection)
        super().finish()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        body = self._body()
        rule = self.proxy._take(self.command, unquote(parts.path), parts.query)
        if rule is not None and rule.action == "fail":
            return self._answer(rule)
        if rule is not None and rule.action == "stall":
            if self.proxy._stopping.wait(rule.seconds):  # None: until the proxy stops
                self.close_connection = True
                return None
        self._forward(body, rule if rule is not None and rule.action == "reset" else None)
        return None

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_COPY = do_OPTIONS = _handle

    def _answer(self, rule: Rule) -> None:
        text = f"{rule.status} injected by the test proxy\n".encode()
        self.send_response(rule.status)
        if rule.retry_after is not None:
            self.send_header("Retry-After", rule.retry_after)
        self.send_header("X-Trans-Id", f"tx-test-proxy-{len(self.proxy.log)}")
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(text)

    def _forward(self, body: bytes, reset: Rule | None) -> None:
        up = self.proxy.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=300)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        headers["Host"] = up.netloc
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else len(data)
        self.send_header("Content-Length", str(length or 0))
        self.end_headers()
        if self.command == "HEAD":
            return
        if reset is not None:
            self.wfile.write(data[:reset.after])
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))  # close = RST
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.fixture(name="swift_proxy")
def swift_proxy_fixture(os_env):
    """A started proxy; ``swift_proxy.url`` routes the test account's storage URL through
    it (set it as OS_STORAGE_URL or SwiftSettings.storage_url)."""
    from undercloud_backup import config
    from undercloud_backup.store.connection import SwiftStore

    with SwiftStore.connect(config.swift_settings_from_env()) as store:
        real = store.url
    with SwiftProxy() as proxy:
        proxy.account_url = proxy.storage_url(real)
        yield proxy
