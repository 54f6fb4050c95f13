"""Connections that never send a request: a real process, started with the usual soft limit of 1,024 open
files, holds 1,100 of them and still answers; and it closes them once they have sent nothing in time."""

from __future__ import annotations

import resource
import select
import socket
from pathlib import Path

import httpx
import pytest

from tests.support.apps import PATIENCE_S, wait_until
from tests.support.servers import free_port, start, wait_served

IDLE = 1100


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * IDLE + 200:
        pytest.skip(f"the hard limit on open files is {hard}: too low to open {IDLE} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2 * IDLE + 200), hard))  # the test's own sockets
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_idle(port: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE)]


def descriptors(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def serve(tiny_model_dir: Path, tmp_path: Path, first_request_timeout_s: float):
    port = free_port()
    args = ["--model", f"local-dir:{tiny_model_dir}", "--port", str(port)]
    proc = start([*args, "--first-request-timeout-s", str(first_request_timeout_s)], tmp_path, open_files=1024)
    url = f"http://127.0.0.1:{port}"
    wait_served(url, proc)
    return proc, port, url


def test_idle_connections_beyond_1024_do_not_stop_the_server_answering(tiny_model_dir, tmp_path, many_files):
    proc, port, url = serve(tiny_model_dir, tmp_path, first_request_timeout_s=600)  # they stay open here
    idle = []
    try:
        idle = open_idle(port)
        wait_until(lambda: descriptors(proc.pid) > IDLE, "the server to accept every idle connection")
        r = httpx.get(f"{url}/healthz", timeout=PATIENCE_S)
        assert r.status_code == 200  # with 1,024 descriptors it would answer nobody until they went away
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        proc.wait(PATIENCE_S)
    assert "open-file limit raised from 1024" in (proc.stdout.read() if proc.stdout else "")


def test_connections_that_send_nothing_are_closed(tiny_model_dir, tmp_path, many_files):
    proc, port, url = serve(tiny_model_dir, tmp_path, first_request_timeout_s=1)
    idle = []
    try:
        idle = open_idle(port)
        closed: set[int] = set()
        by_fd = {sock.fileno(): sock for sock in idle}
        poller = select.poll()  # select() stops at descriptor 1,024
        for fd in by_fd:
            poller.register(fd, select.POLLIN | select.POLLHUP)

        def all_closed() -> bool:
            for fd, _ in poller.poll(500):
                if by_fd[fd].recv(1) == b"":  # the server closed it
                    closed.add(fd)
                    poller.unregister(fd)
            return len(closed) == IDLE

        wait_until(all_closed, "the server to close every connection that sent nothing")
        # One that sends its request in time is served as before.
        assert httpx.get(f"{url}/healthz", timeout=PATIENCE_S).status_code == 200
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        proc.wait(PATIENCE_S)
