"""A flaky HTTP proxy for tests: forwards to a registry, failing the requests it is told to
fail the way networks and registries do (a dropped connection, 429 with Retry-After, 503, a
blob cut off half-way), and records what it saw."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}

# Faults: "drop" closes the connection without an answer; "429" answers Too Many Requests with
# Retry-After: 1; "503" answers Service Unavailable; "cut" (blob GETs only) sends the headers
# and half the body, then closes; "empty" (any blob GET, ranged too) sends the headers, then
# closes; "trickle" (blob GETs) sends the body 1 KiB every 0.25 s.


@dataclass
class Seen:
    method: str
    path: str
    range: str
    fault: str
    status: int
    at: float


@dataclass
class FlakyProxy:
    upstream: str  # host:port of the registry
    faults: list[str] = field(default_factory=list)  # used up one per request, in order
    forever: str = ""  # then this fault for every request ("" for none)
    ranges: bool = True  # False: the Range header is not passed on (the blob comes whole)
    seen: list[Seen] = field(default_factory=list)
    host: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_fault(self, method: str, path: str, has_range: bool) -> str:
        blob = method == "GET" and "/blobs/sha256:" in path

        def applies(fault: str) -> bool:
            return (fault != "cut" or (blob and not has_range)) and (
                fault not in ("empty", "trickle") or blob
            )

        with self.lock:
            for i, fault in enumerate(self.faults):
                if applies(fault):
                    return self.faults.pop(i)
            return self.forever if applies(self.forever) else ""

    def record(self, handler: BaseHTTPRequestHandler, fault: str, status: int) -> None:
        with self.lock:
            self.seen.append(
                Seen(
                    handler.command,
                    handler.path,
                    handler.headers.get("Range", ""),
                    fault,
                    status,
                    time.monotonic(),
                )
            )


def _handler(proxy: FlakyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a drop also hits a reused connection

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault = proxy.next_fault(self.command, self.path, "Range" in self.headers)
            if fault == "drop":
                proxy.record(self, fault, 0)
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if fault in ("429", "503"):
                proxy.record(self, fault, int(fault))
                self.send_response(int(fault))
                if fault == "429":
                    self.send_header("Retry-After", "1")
                self.send_header("Content-Type", "text/html")
                page = b"<html><body>busy, come back later</body></html>"
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(page)
                return
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in HOP_BY_HOP and (proxy.ranges or k.lower() != "range")
            }
            upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
            finally:
                upstream.close()
            proxy.record(self, fault, answer.status)
            self.send_response(answer.status, answer.reason)
            for key, value in answer.getheaders():
                if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if fault == "trickle":  # 1 KiB every 0.25 s, as a stalling registry sends
                try:
                    for start in range(0, len(data), 1024):
                        self.wfile.write(data[start : start + 1024])
                        self.wfile.flush()
                        time.sleep(0.25)
                except OSError:
                    self.close_connection = True  # the reader gave up
                return
            if fault in ("cut", "empty") and len(data) > 1:
                self.wfile.write(data[: len(data) // 2 if fault == "cut" else 0])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

    return Handler


@contextmanager
def flaky_proxy(
    upstream: str, faults: list[str] | None = None, forever: str = "", ranges: bool = True
) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(upstream, list(faults or []), forever, ranges)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    proxy.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
