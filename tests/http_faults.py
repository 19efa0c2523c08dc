"""A small HTTP server on 127.0.0.1 that fails on request, for the fetch tests.

Each path serves its bytes after working through its queue of faults, one a request:

    "503", "429", "500", ...  that HTTP status (an error page, no video)
    "reset"                   headers and half the body, then the connection is reset (RST)
    "truncate"                headers and half the body, then the connection is closed (FIN)
    "stall"                   nothing for `stall_s` seconds, then the response
    "drip"                    the body in 1 KiB pieces, `stall_s` / 10 seconds apart
    "nolength"                the body without a Content-Length (the client cannot tell its size)

A path never added is a permanent 404. `delay_s` (per path) holds every response that long,
so that downloads overlap; `peak` is the most requests the server was in at once, `hits`
the requests per path.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer:
    """The server and its per-path behaviour; `start()` serves in a thread, `stop()` ends it."""

    def __init__(self, stall_s: float = 2.0) -> None:
        self.stall_s = stall_s
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, deque[str]] = {}
        self.delay_s: dict[str, float] = {}
        self.hits: Counter[str] = Counter()
        self.peak = 0
        self._inflight = 0
        self._lock = threading.Lock()
        self._httpd = _Quiet(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http-faults", daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def add(self, path: str, data: bytes, faults: tuple[str, ...] = (), delay_s: float = 0.0) -> str:
        """Serve `data` at `path` after `faults`; returns its URL."""
        with self._lock:
            self.files[path] = data
            self.faults[path] = deque(faults)
            self.delay_s[path] = delay_s
        return self.url(path)

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _enter(self, path: str) -> tuple[bytes | None, str | None, float]:
        with self._lock:
            self.hits[path] += 1
            self._inflight += 1
            self.peak = max(self.peak, self._inflight)
            queue = self.faults.get(path)
            return self.files.get(path), (queue.popleft() if queue else None), self.delay_s.get(path, 0.0)

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1


class _Quiet(ThreadingHTTPServer):
    """Clients that hang up (a client's timeout, a size cap) are expected, not tracebacks."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass


def _handler(server: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            data, fault, delay = server._enter(path)
            try:
                time.sleep(delay)
                self._respond(data, fault)
            finally:
                server._leave()

        def _respond(self, data: bytes | None, fault: str | None) -> None:
            if data is None:
                self.send_error(404)
                return
            if fault and fault.isdigit():
                self.send_error(int(fault))
                return
            if fault == "stall":
                time.sleep(server.stall_s)
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            if fault != "nolength":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if fault == "truncate":
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
                return
            if fault == "reset":
                self.wfile.write(data[: len(data) // 2])
                # linger 0: closing sends a RST instead of a FIN (what a dying proxy does)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return
            if fault == "drip":
                for i in range(0, len(data), 1024):
                    self.wfile.write(data[i:i + 1024])
                    time.sleep(server.stall_s / 10)
                return
            self.wfile.write(data)

    return Handler
