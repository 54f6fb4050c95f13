"""Zero-shot throughput: the server over HTTP against a direct batched forward of the same model.

Both run in this one process on the same loaded model, alternately, so machine load affects both
alike: (a) ``direct``: ``encode_image`` on preprocessed batches plus the class-feature matmul, the
best the hardware does with no server at all; (b) ``http``: a real uvicorn server on loopback, fed
by ``--concurrency`` clients that each send one JPEG per request, so the engine's micro-batching
has to assemble the batches. The ratio (b)/(a) is the share of the hardware the server keeps.
Prints both rates and their ratio per round, then the means and the server's latency percentiles.

    python -m benchmarks.zero_shot_throughput --model ViT-B-32 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image
from ttaserve_client import Client

from server.api import create_app
from server.engine.classes import ClassFeatures
from server.settings import Settings

LABELS = [f"class number {i}" for i in range(10)]


def make_jpegs(n: int, size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        # Smooth random images: JPEG-friendly, like photos, unlike white noise.
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def run_direct(engine, jpegs: list[bytes], batch_size: int, labels: list[str] = LABELS) -> float:
    """Images per second of encode + classify on preprocessed batches, on the engine's backbone."""
    backbone = engine.backbone
    tensors = torch.stack([backbone.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs])
    classes = ClassFeatures(backbone, 2**20).get(tuple(labels), ("a photo of a {}.",))
    started = time.perf_counter()
    for i in range(0, len(tensors), batch_size):
        feats = backbone.encode_images(tensors[i : i + batch_size])
        (backbone.logit_scale * feats @ classes.T).cpu()
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return len(tensors) / (time.perf_counter() - started)


async def run_http(
    url: str, jpegs: list[bytes], concurrency: int, labels: list[str] = LABELS, per_request: int = 1
) -> tuple[float, list[float]]:
    """Images per second and per-request latencies with ``concurrency`` clients, ``per_request`` images each."""
    chunks = [jpegs[i : i + per_request] for i in range(0, len(jpegs), per_request)]
    bodies = [
        json.dumps({"images": [base64.b64encode(b).decode() for b in chunk], "labels": labels, "top_k": 1}).encode()
        for chunk in chunks
    ]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                t0 = time.perf_counter()
                r = await client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(jpegs) / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="ViT-B-32", help="any TTA_MODEL form; ViT-B-32 without --pretrained has random weights"
    )
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--images", type=int, default=128, help="images per measurement")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="direct batch size = server max_batch_size")
    parser.add_argument("--batch-delay-ms", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating direct/http rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = Settings(
        model=args.model,
        pretrained=args.pretrained,
        device=args.device,
        precision=args.precision,
        port=args.port,
        max_batch_size=args.batch_size,
        max_batch_delay_ms=args.batch_delay_ms,
        torch_threads=args.threads,
        request_timeout_s=600,
        log_level="warning",
        data_dir=Path("benchmarks/out/data"),
        _env_file=None,
    )
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{args.port}"
    with Client(url) as client:
        ready = client.wait_ready(600)
    if not ready:
        raise SystemExit("server did not become ready")

    engine = app.state.runtime.engine
    jpegs = make_jpegs(args.images, 224, seed=1)
    print(
        f"model={args.model} pretrained={args.pretrained} device={args.device} threads={args.threads} "
        f"images={args.images} concurrency={args.concurrency} batch={args.batch_size}",
        flush=True,
    )
    run_direct(engine, jpegs[: args.batch_size], args.batch_size)  # warm-up of both paths
    asyncio.run(run_http(url, jpegs[: args.concurrency], args.concurrency))
    direct, http, latencies = [], [], []
    for r in range(args.rounds):
        direct.append(run_direct(engine, jpegs, args.batch_size))
        rate, lat = asyncio.run(run_http(url, jpegs, args.concurrency))
        http.append(rate)
        latencies += lat
        print(
            f"round {r + 1}: direct {direct[-1]:.2f} img/s, http {http[-1]:.2f} img/s, "
            f"ratio {http[-1] / direct[-1]:.3f}",
            flush=True,
        )
    server.should_exit = True
    thread.join(30)
    lat = sorted(latencies)
    result = {
        "model": args.model,
        "device": args.device,
        "threads": args.threads,
        "concurrency": args.concurrency,
        "direct_images_per_s": statistics.mean(direct),
        "http_images_per_s": statistics.mean(http),
        "ratio": statistics.mean(http) / statistics.mean(direct),
        "http_p50_s": lat[len(lat) // 2],
        "http_p95_s": lat[int(len(lat) * 0.95) - 1],
    }
    print(f"direct batched forward: {result['direct_images_per_s']:.2f} img/s")
    print(
        f"server over HTTP, {args.concurrency} clients: {result['http_images_per_s']:.2f} img/s "
        f"(p50 {result['http_p50_s'] * 1000:.0f} ms, p95 {result['http_p95_s'] * 1000:.0f} ms)"
    )
    print(f"ratio http/direct: {result['ratio']:.3f} (target >= 0.70)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
