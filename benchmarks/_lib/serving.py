"""Serving a benchmark's model over loopback: a ``python -m server`` subprocess on a free port, readiness,
and many concurrent clients."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from safetensors.torch import save_file
from ttaserve_client import Client

from server.clip import Backbone
from server.clip.spec import HF_HUB, LOCAL_DIR, SHIPPED_MODELS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_model_env(args: argparse.Namespace, backbone: Backbone, workdir: Path) -> dict[str, str]:
    """TTA_MODEL / TTA_PRETRAINED that load the very weights this process holds.

    A built-in architecture without pretrained weights is initialised at random, differently in each
    process: its weights are written to a file the server loads as its checkpoint.
    """
    model = args.model
    env = {"TTA_MODEL": model}
    if args.pretrained is not None:
        env["TTA_PRETRAINED"] = args.pretrained
    elif not (model in SHIPPED_MODELS or model.startswith((LOCAL_DIR, HF_HUB))):
        path = workdir / "weights.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in backbone.model.state_dict().items()}, str(path))
        env["TTA_PRETRAINED"] = str(path)
    return env


class Server:
    """``python -m server`` in a subprocess on a free loopback port, with limits wide enough for the benchmark."""

    def __init__(self, args: argparse.Namespace, backbone: Backbone, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        repo = Path(__file__).resolve().parents[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
        env |= server_model_env(args, backbone, workdir) | {
            "TTA_DEVICE": args.device,
            "TTA_PRECISION": args.precision,
            "TTA_TORCH_THREADS": str(args.threads),
            "TTA_HOST": "127.0.0.1",
            "TTA_PORT": str(self.port),
            "TTA_DATA_DIR": str(workdir / "data"),
            "TTA_REQUEST_TIMEOUT_S": "86400",
            "TTA_LOG_LEVEL": "warning",
            "TTA_MAX_VIEWS": str(max(128, args.views)),
            "TTA_MAX_STEPS": str(max(10, args.steps)),
            "TTA_MAX_LABELS": str(max(1000, *args.classes)),
            "TTA_MAX_QUEUE_SIZE": str(max(256, 4 * max(args.concurrency))),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")])),
        }
        self.log = (workdir / "server.log").open("wb")
        # The working directory is the temporary folder, so no stray .env is read.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server"], cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.workdir = workdir

    def wait_ready(self, timeout_s: float = 900.0) -> None:
        with Client(self.url) as client:
            if client.wait_ready(timeout_s, alive=lambda: self.process.poll() is None):
                return
        if self.process.poll() is not None:
            raise SystemExit(f"the server exited with {self.process.returncode}:\n{self.tail()}")
        raise SystemExit(f"the server was not ready within {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return (self.workdir / "server.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


async def post_all(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float], list[dict[str, Any]]]:
    """Send every body with ``concurrency`` clients, one request each at a time.

    Returns the wall time, the latency of each request and each request's first result, in order.
    """
    latencies: list[float] = [0.0] * len(bodies)
    results: list[dict[str, Any]] = [{}] * len(bodies)
    pending = list(range(len(bodies)))[::-1]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

        async def worker() -> None:
            while pending:
                j = pending.pop()
                t0 = time.perf_counter()
                r = await client.post("/v1/classify", content=bodies[j], headers={"content-type": "application/json"})
                latencies[j] = time.perf_counter() - t0
                if r.status_code != 200:
                    raise RuntimeError(f"/v1/classify answered {r.status_code}: {r.text[:500]}")
                results[j] = r.json()["results"][0]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return wall, latencies, results
