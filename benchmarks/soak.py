"""Soak: a real server under mixed traffic for a fixed time, watched minute by minute.

``python -m server`` runs in its own process on loopback; ``--clients`` async clients send, each in a
loop: zero-shot requests (inline labels or a label set), adaptation requests with every method the
server offers, invalid requests (bad base64, a non-image, an unknown method, no labels), deliberate
disconnects (an adaptation request dropped after ``--disconnect-after-s``), and every
``--label-set-every`` requests a new label set, used, then deleted. With ``--keys N`` the server gets N
API keys (and one admin key) and the clients use them in turn.

Each ``--interval-s`` it prints: requests by status, p50 and p99 latency of the answered ones, the
server's resident memory and open file descriptors (from /proc). At the end: unexpected 5xx (any 500,
and 503 outside a drain), hung requests (no answer within the request deadline plus a margin), the
resident-memory growth after the first interval (the warm-up), and the adaptation requests served
zero-shot by reason (``tta_adapt_skipped_total``).

    python -m benchmarks.soak --model demo --minutes 10 --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from ttaserve_client import Client

from benchmarks._lib.data import synthetic_subsets

DEADLINE_S = 30.0  # the server's request deadline in the soak
HUNG_S = DEADLINE_S + 30.0  # an answer later than this counts as hung


def server_memory(pid: int) -> tuple[float, int]:
    """Resident MiB and open file descriptors of ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss_kib / 1024, sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


class Soak:
    def __init__(
        self,
        url: str,
        images: list[str],
        labels: list[str],
        methods: list[str],
        keys: list[tuple[str, str, str]],
        args: Any,
    ):
        self.url, self.images, self.labels, self.methods, self.keys, self.args = (
            url,
            images,
            labels,
            methods,
            keys,
            args,
        )
        self.window: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.total: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.hung = 0
        self.sets = 0

    def headers(self, index: int, admin: bool = False) -> dict[str, str]:
        """Client ``index`` belongs to team ``index % keys``: its classify key, or its admin key."""
        if not self.keys:
            return {}
        _, key, admin_key = self.keys[index % len(self.keys)]
        return {"Authorization": f"Bearer {admin_key if admin else key}"}

    def record(self, kind: str, status: int | str, seconds: float | None) -> None:
        key = f"{kind} {status}"
        self.window[key] += 1
        self.total[key] += 1
        if seconds is not None and isinstance(status, int) and status < 400:
            self.latencies.append(seconds)
        if status == 500 or (status == 503 and kind != "disconnect"):
            self.unexpected.append(key)

    def body(self, rng: random.Random, kind: str, label_set: str | None) -> dict[str, Any]:
        n = rng.randint(1, 4)
        body: dict[str, Any] = {"images": rng.sample(self.images, n), "seed": rng.randint(0, 1000)}
        if label_set:
            body["label_set"] = label_set
        else:
            body["labels"] = rng.sample(self.labels, rng.randint(2, 16))
        if kind in ("adapt", "disconnect"):
            body["method"] = rng.choice(self.methods)
            body["options"] = {"views": rng.choice([8, 16])}
            body["images"] = body["images"][:2]
        if kind == "invalid":
            broken = rng.choice(["base64", "not_image", "method", "labels"])
            if broken == "base64":
                body["images"] = ["not base64!"]
            elif broken == "not_image":
                body["images"] = [base64.b64encode(b"just text").decode()]
            elif broken == "method":
                body["method"] = "no_such_method"
            else:
                body.pop("label_set", None)
                body["labels"] = []
        return body

    async def client(self, index: int, until: float) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        label_set: str | None = None
        sent = 0
        async with httpx.AsyncClient(base_url=self.url, timeout=HUNG_S) as http:
            while time.monotonic() < until:
                sent += 1
                if sent % self.args.label_set_every == 0:
                    label_set = await self.rotate_label_set(http, rng, index, label_set)
                kind = rng.choices(["zero_shot", "adapt", "invalid", "disconnect"], [60, 25, 10, 5])[0]
                body = self.body(rng, kind, label_set if rng.random() < 0.5 else None)
                started = time.monotonic()
                try:
                    timeout = self.args.disconnect_after_s if kind == "disconnect" else HUNG_S
                    r = await http.post("/v1/classify", json=body, headers=self.headers(index), timeout=timeout)
                    self.record(kind, r.status_code, time.monotonic() - started)
                except httpx.TimeoutException:
                    if kind == "disconnect":
                        self.record(kind, "dropped", None)
                    else:
                        self.hung += 1
                        self.record(kind, "hung", None)
                except httpx.TransportError as exc:
                    self.record(kind, type(exc).__name__, None)

    async def rotate_label_set(
        self, http: httpx.AsyncClient, rng: random.Random, index: int, old: str | None
    ) -> str | None:
        headers = self.headers(index, admin=True)
        if old is not None:
            r = await http.delete(f"/v1/label-sets/{old}", headers=headers)
            self.record("label_set_delete", r.status_code, None)
        self.sets += 1
        name = f"soak-{index}-{self.sets}"
        r = await http.post(
            "/v1/label-sets", json={"name": name, "labels": rng.sample(self.labels, 8)}, headers=headers
        )
        self.record("label_set_create", r.status_code, None)
        return name if r.status_code == 201 else None

    async def text_cache_mib(self) -> float:
        """``tta_text_cache_bytes`` (what the caches hold, within TTA_TEXT_CACHE_BYTES), in MiB."""
        headers = {"Authorization": f"Bearer {self.keys[0][1]}"} if self.keys else {}
        async with httpx.AsyncClient(base_url=self.url, timeout=HUNG_S) as http:
            text = (await http.get("/metrics", headers=headers)).text
        match = re.search(r"^tta_text_cache_bytes (\S+)$", text, re.M)
        return float(match.group(1)) / 2**20 if match else float("nan")

    async def watch(self, pid: int, until: float, rows: list[dict[str, Any]]) -> None:
        minute = 0
        while time.monotonic() < until:
            await asyncio.sleep(min(self.args.interval_s, max(0.0, until - time.monotonic())))
            minute += 1
            rss, fds = server_memory(pid)
            cache_mib = await self.text_cache_mib()
            lat = sorted(self.latencies)
            q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
            row = {"interval": minute, "rss_mib": rss, "fds": fds, "text_cache_mib": cache_mib, "p50_s": q[49],
                   "p99_s": q[98], "answered": len(lat), "statuses": dict(sorted(self.window.items()))}  # fmt: skip
            rows.append(row)
            print(
                f"[{minute * self.args.interval_s / 60:5.1f} min] rss {rss:7.1f} MiB  text caches "
                f"{cache_mib:5.1f} MiB  fds {fds:4d}  answered "
                f"{len(lat):5d}  p50 {q[49] * 1000:7.0f} ms  p99 {q[98] * 1000:7.0f} ms  "
                + "  ".join(f"{k}: {v}" for k, v in sorted(self.window.items())),
                flush=True,
            )
            self.window.clear()
            self.latencies.clear()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--interval-s", type=float, default=60.0, help="seconds per printed row")
    parser.add_argument("--label-set-every", type=int, default=10, help="requests per client between label sets")
    parser.add_argument("--disconnect-after-s", type=float, default=0.05)
    parser.add_argument("--keys", type=int, default=0, help="API keys to create (0: no authentication)")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE",
        help="also set this in the server's environment (e.g. TTA_TEXT_CACHE_BYTES=..., MALLOC_ARENA_MAX=2)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    args = parser.parse_args(argv)

    (subset,) = synthetic_subsets(["clean"], [0], 64, seed=args.seed)
    images = []
    for image in subset.images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        images.append(base64.b64encode(buf.getvalue()).decode())
    # Team i has a classify key and an admin key of one name: one tenant, whose label sets its requests use.
    keys = [
        (
            f"team{i}",
            f"soak-{i}-{random.Random(i).getrandbits(64):x}",
            f"soak-admin-{i}-{random.Random(-i).getrandbits(64):x}",
        )
        for i in range(args.keys)
    ]
    workdir = Path(tempfile.mkdtemp(prefix="tta-soak-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
    env.update({"TTA_MODEL": args.model, "TTA_PORT": str(args.port), "TTA_DATA_DIR": str(workdir / "data"),
                "TTA_DEVICE": "cpu", "TTA_TORCH_THREADS": str(args.threads), "TTA_REQUEST_TIMEOUT_S": str(DEADLINE_S),
                "TTA_LOG_LEVEL": "warning"})  # fmt: skip
    env.update(dict(item.split("=", 1) for item in args.server_env))
    if keys:
        env["TTA_API_KEYS"] = ",".join(f"{name}:{key}" for name, key, _ in keys)
        env["TTA_ADMIN_API_KEYS"] = ",".join(f"{name}:{admin}" for name, _, admin in keys)
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server"], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{args.port}"
    try:
        with Client(url, api_key=keys[0][1] if keys else None) as client:
            if not client.wait_ready(600, alive=lambda: proc.poll() is None):
                raise SystemExit(f"the server did not start:\n{(workdir / 'server.log').read_text()[-3000:]}")
            methods = [m.name for m in client.methods().methods if m.name != "zero_shot"]
        soak = Soak(url, images, subset.class_names, methods, keys, args)
        rows: list[dict[str, Any]] = []
        print(f"soak: {args.clients} clients for {args.minutes:g} min on {args.model}, methods {', '.join(methods)}, "
              f"{f'{args.keys} keys' if keys else 'no keys'}; server pid {proc.pid}", flush=True)  # fmt: skip

        async def run() -> None:
            until = time.monotonic() + 60 * args.minutes
            await asyncio.gather(
                soak.watch(proc.pid, until, rows), *(soak.client(i, until) for i in range(args.clients))
            )

        asyncio.run(run())
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        proc.terminate()
        proc.wait(60)
    skipped = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^tta_adapt_skipped_total\{reason="(\w+)"\} (\S+)$', metrics, re.M)
    }
    warm, last = rows[0]["rss_mib"], rows[-1]["rss_mib"]
    result = {
        "rows": rows,
        "totals": dict(sorted(soak.total.items())),
        "unexpected_5xx": len(soak.unexpected),
        "hung": soak.hung,
        "rss_growth_after_warm_up": (last - warm) / warm,
        "first_p99_s": rows[0]["p99_s"],
        "last_p99_s": rows[-1]["p99_s"],
        "served_zero_shot": skipped,
        "label_sets_created": soak.sets,
    }
    print(f"\ntotals: {json.dumps(result['totals'])}")
    print(f"unexpected 5xx: {result['unexpected_5xx']}  hung: {result['hung']}  label sets created: {soak.sets}")
    print(f"resident memory {warm:.0f} MiB after the first interval, {last:.0f} MiB at the end: "
          f"{100 * result['rss_growth_after_warm_up']:+.1f}%")  # fmt: skip
    print(f"p99: {1000 * rows[0]['p99_s']:.0f} ms in the first interval, {1000 * rows[-1]['p99_s']:.0f} ms in the last")
    first_cache, last_cache = rows[0]["text_cache_mib"], rows[-1]["text_cache_mib"]
    print(f"text caches: {first_cache:.1f} MiB after the first interval, {last_cache:.1f} MiB at the end "
          f"(budget TTA_TEXT_CACHE_BYTES, default 64 MiB)")  # fmt: skip
    print(f"adaptation requests served zero-shot, by reason: {skipped or 'none'}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
