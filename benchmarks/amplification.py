"""Zero-shot latency beside hostile requests: the amplification cases of the hardening issue, side by side.

``python -m server`` runs in its own process on loopback. ``--clients`` zero-shot clients send one-image
requests against a label set whose text is cached, first alone, then beside two more clients sending one
case in a loop: plain one-image requests (what any two busy clients cost), 16 PNG strips of 1 x 100,000
pixels, a template with one 60,000-letter word, a TPT ``ctx_init`` of 20,000 letters, and 1,000 new labels x
CLIP's 80 templates (80,000 prompts not cached, a new label set each time). Per phase it prints: the other
clients' answers by status, the zero-shot p50 and p99 (and the p99 against the phase alone), and the
server's peak resident memory.

    python -m benchmarks.amplification --model demo --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from ttaserve_client import Client

from benchmarks._lib.data import synthetic_subsets
from benchmarks._lib.serving import free_port
from benchmarks.soak import server_memory


def strip_png() -> str:
    buf = io.BytesIO()
    Image.new("L", (100_000, 1), 128).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def hostile_cases(image: str) -> dict[str, Callable[[int], dict[str, Any]]]:
    """Each case's request body, given a counter (so text that must not be cached is new every time)."""
    strips = [strip_png()] * 16
    return {
        "plain requests (reference)": lambda i: {"images": [image], "labels": ["cat", "dog"]},
        "16 strips 1x100,000 px": lambda i: {"images": strips, "labels": ["cat", "dog"]},
        "template of a 60,000-letter word": lambda i: {
            "images": [image], "labels": ["cat", "dog"], "templates": ["a photo of a {} " + "x" * 60_000]
        },
        "ctx_init of 20,000 letters (tpt)": lambda i: {
            "images": [image], "labels": ["cat", "dog"], "method": "tpt", "options": {"ctx_init": "a " * 10_000}
        },
        "1,000 new labels x 80 templates": lambda i: {
            "images": [image], "labels": [f"thing {i} number {k}" for k in range(1000)], "templates": "openai_imagenet"
        },
    }  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def phase(
    url: str, seconds: float, clients: int, zero_shot: dict[str, Any], hostile: Callable[[int], dict[str, Any]] | None,
    pid: int,
) -> dict[str, Any]:  # fmt: skip
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    peak = [server_memory(pid)[0]]
    until = time.monotonic() + seconds
    counter = iter(range(10**9))
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def zero_shot_client() -> None:
            while time.monotonic() < until:
                t0 = time.perf_counter()
                r = await client.post("/v1/classify", json=zero_shot)
                if r.status_code != 200:
                    raise RuntimeError(f"a zero-shot request got {r.status_code}: {r.text[:300]}")
                latencies.append(time.perf_counter() - t0)

        async def hostile_client() -> None:
            assert hostile is not None
            while time.monotonic() < until:
                r = await client.post("/v1/classify", json=hostile(next(counter)))
                code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
                statuses[f"{r.status_code} {code}".strip()] += 1

        async def watch() -> None:
            while time.monotonic() < until:
                peak[0] = max(peak[0], server_memory(pid)[0])
                await asyncio.sleep(0.1)

        hostiles = [hostile_client() for _ in range(2)] if hostile is not None else []
        await asyncio.gather(watch(), *(zero_shot_client() for _ in range(clients)), *hostiles)
    return {
        "n": len(latencies),
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "hostile": dict(statuses),
        "peak_rss_mib": peak[0],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--clients", type=int, default=4, help="zero-shot clients")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    args = parser.parse_args(argv)

    (subset,) = synthetic_subsets(["clean"], [0], 1, seed=0)
    buf = io.BytesIO()
    subset.images[0].save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    zero_shot = {"images": [image], "labels": subset.class_names}
    workdir = Path(tempfile.mkdtemp(prefix="tta-amplification-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
    env.update({"TTA_MODEL": args.model, "TTA_PORT": str(port), "TTA_DATA_DIR": str(workdir / "data"),
                "TTA_DEVICE": "cpu", "TTA_TORCH_THREADS": str(args.threads), "TTA_LOG_LEVEL": "warning"})  # fmt: skip
    log = (workdir / "server.log").open("wb")
    command = [sys.executable, "-m", "server"]
    proc = subprocess.Popen(command, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    rows: dict[str, dict[str, Any]] = {}
    try:
        with Client(url) as c:
            if not c.wait_ready(600, alive=lambda: proc.poll() is None):
                raise SystemExit(f"the server did not start:\n{(workdir / 'server.log').read_text()[-3000:]}")
        httpx.post(f"{url}/v1/classify", json=zero_shot, timeout=120).raise_for_status()  # its text, cached
        phases: dict[str, Callable[[int], dict[str, Any]] | None] = {"alone": None, **hostile_cases(image)}
        print(f"amplification: {args.clients} zero-shot clients, {args.seconds:g} s per phase, {args.model}, "
              f"server pid {proc.pid}", flush=True)  # fmt: skip
        print(f"{'beside':34} {'hostile answers':34} {'zero-shot n':>11} {'p50':>8} {'p99':>8} {'p99/alone':>9} "
              f"{'peak RSS':>9}")  # fmt: skip
        for name, hostile in phases.items():
            row = asyncio.run(phase(url, args.seconds, args.clients, zero_shot, hostile, proc.pid))
            rows[name] = row
            answers = ", ".join(f"{k} x{v}" for k, v in sorted(row["hostile"].items())) or "-"
            ratio = row["p99_s"] / rows["alone"]["p99_s"]
            print(f"{name:34} {answers:34} {row['n']:>11} {1000 * row['p50_s']:>6.0f}ms {1000 * row['p99_s']:>6.0f}ms "
                  f"{ratio:>9.2f} {row['peak_rss_mib']:>6.0f}MiB", flush=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(60)
    return rows


if __name__ == "__main__":
    main()
