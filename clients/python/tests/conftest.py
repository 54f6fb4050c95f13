"""The client's tests: a live TTAServe (``TTASERVE_URL``, serving a model with at least the demo's methods)
and loopback stand-ins that answer what a test scripts (429, 503, a reset connection)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


@pytest.fixture(scope="session")
def server_url() -> str:
    url = os.environ.get("TTASERVE_URL")
    if not url:
        pytest.fail("set TTASERVE_URL to a running server (the server's tests/e2e/test_client.py does)")
    return url


@dataclass
class Scripted:
    """A loopback HTTP server that answers request k with ``script[k]``: ``(status, headers, body)``, or
    ``"reset"`` (the connection is dropped with a TCP reset once the request has arrived). Past the
    script, every request gets its last entry."""

    script: list[tuple[int, dict[str, str], bytes] | str]
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next((int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length"), 0)
        while len(body) < length:
            body += conn.recv(65536)
        action = self.script[min(len(self.seen), len(self.script) - 1)]
        self.seen.append(lines[0])
        if action == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        status, headers, payload = action  # type: ignore[misc]
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        conn.sendall(
            f"HTTP/1.1 {status} X\r\ncontent-length: {len(payload)}\r\nconnection: close\r\n{extra}\r\n".encode()
            + payload
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread
        self.sock.close()


@pytest.fixture
def scripted() -> Iterator[type[Scripted]]:
    made: list[Scripted] = []

    def make(script: list[tuple[int, dict[str, str], bytes] | str]) -> Scripted:
        made.append(Scripted(script))
        return made[-1]

    yield make  # type: ignore[misc]
    for server in made:
        server.close()


class Pixels:
    """Just enough of a uint8 array for ``array_png`` (the client's tests run without numpy)."""

    def __init__(self, height: int, width: int, seed: int):
        self.shape, self.dtype = (height, width, 3), "uint8"
        self._bytes = bytes((seed * 7919 + i * 31) % 256 for i in range(height * width * 3))

    def tobytes(self) -> bytes:
        return self._bytes
