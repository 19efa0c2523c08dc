"""A TCP proxy in front of the S3 server that measures and, on demand, holds traffic.

Tests and benchmarks point `AWS_ENDPOINT_URL` at it instead of at the server:
- bytes sent back to each client process are counted per pid (the client's socket is found
  with psutil), so "what did rank 3 download" is measured on the wire, not taken from the
  code path that is under test;
- `hold_uploads()` stops forwarding client -> server bytes (requests and uploads stall
  mid-body, as on a saturated link) until `release()`, so a test can kill a process while
  its upload is provably in flight.
"""

from __future__ import annotations

import collections
import socket
import threading
from typing import Any

import psutil


class S3Proxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.upstream = host, (host, upstream_port)
        self._srv = socket.create_server((host, 0))
        self.port = self._srv.getsockname()[1]
        self.endpoint = f"http://{host}:{self.port}"
        self.down_bytes: collections.Counter[int] = collections.Counter()  # pid -> bytes server -> client
        self.up_bytes: collections.Counter[int] = collections.Counter()  # pid -> bytes client -> server
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ control
    def hold_uploads(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def reset(self) -> None:
        with self._lock:
            self.down_bytes.clear()
            self.up_bytes.clear()

    def close(self) -> None:
        self._stop = True
        self._open.set()
        self._srv.close()

    # ------------------------------------------------------------------ plumbing
    def _pid_of(self, peer: tuple[str, int]) -> int:
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and (c.laddr.ip, c.laddr.port) == peer and c.raddr and c.raddr.port == self.port:
                return c.pid or -1
        return -1

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, peer = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, peer), daemon=True).start()

    def _serve(self, client: socket.socket, peer: Any) -> None:
        pid = self._pid_of(peer[:2])
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pump, args=(client, upstream, pid, True), daemon=True).start()
        self._pump(upstream, client, pid, False)

    def _pump(self, src: socket.socket, dst: socket.socket, pid: int, upward: bool) -> None:
        try:
            while True:
                if upward:
                    self._open.wait()
                data = src.recv(65536)
                if not data:
                    break
                if upward:
                    self._open.wait()  # held while this chunk was in our hands: keep it back
                dst.sendall(data)
                with self._lock:
                    (self.up_bytes if upward else self.down_bytes)[pid] += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
