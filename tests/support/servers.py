"""Real HTTP servers on loopback: ``python -m server`` in its own process, or an app in a thread of the test."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from ttaserve_client import Client

from tests.support.apps import PATIENCE_S

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    args: list[str], tmp_path: Path, env: dict[str, str] | None = None, open_files: int | None = None
) -> subprocess.Popen[str]:
    """``python -m server ARGS`` with a data directory under ``tmp_path``, on the CPU, output captured;
    ``open_files`` starts it with that soft limit on open files (as many machines do: 1,024)."""

    def limit() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
    full_env.update({"TTA_DATA_DIR": str(tmp_path / "data"), "TTA_DEVICE": "cpu", **(env or {})})
    return subprocess.Popen(
        [sys.executable, "-m", "server", *args],
        cwd=ROOT,
        env=full_env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=limit if open_files is not None else None,
    )


@contextmanager
def running(
    model_dir: Path, tmp_path: Path, *flags: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``python -m server`` on ``model_dir`` with ``flags`` (and ``env``'s TTA_ settings), ready; yields its URL
    and process, killed after unless the test ended it."""
    port = free_port()
    proc = start(["--model", f"local-dir:{model_dir}", "--port", str(port), *flags], tmp_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_served(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(PATIENCE_S)


def wait_served(url: str, proc: subprocess.Popen[str]) -> None:
    """Wait until the process at ``url`` is ready; fail with its output if it exits first."""
    with Client(url, timeout_s=PATIENCE_S) as client:
        if client.wait_ready(PATIENCE_S, alive=lambda: proc.poll() is None):
            return
    if proc.poll() is not None:
        raise AssertionError(f"server exited {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}")
    raise AssertionError("server never became ready")


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a thread of this process; yield its URL once ready.

    For behaviour that is about HTTP itself (a client that disconnects) while the test still holds the
    app's hooks (gated loaders) in its own memory.
    """
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        with Client(url, timeout_s=PATIENCE_S) as client:
            assert client.wait_ready(PATIENCE_S, alive=thread.is_alive), "the server never became ready"
        yield url
    finally:
        server.should_exit = True
        thread.join(PATIENCE_S)
