"""``tta bench``: a load generator printing latency percentiles and throughput."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ttaserve_client.cli.common import api_errors, async_client_of, err, json_option, progress_bar, split
from ttaserve_client.errors import TTAError
from ttaserve_client.images import array_png, walk


@click.command()
@click.argument("images", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--labels", default="a,b,c,d", show_default=True, help="Comma-separated labels.")
@click.option("--label-set", help="A stored label set, instead of --labels.")
@click.option("--method", help="Test-time method; default the server's.")
@click.option("--options", help="The method's options as JSON.")
@click.option("--requests", "-n", "total", type=int, default=100, show_default=True)
@click.option("--concurrency", "-c", type=int, default=8, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True, help="Images per request.")
@click.option("--size", type=int, default=224, show_default=True, help="Side of the generated images.")
@click.pass_context
def bench(
    ctx: click.Context,
    images: tuple[Path, ...],
    labels: str,
    label_set: str | None,
    method: str | None,
    options: str | None,
    total: int,
    concurrency: int,
    batch: int,
    size: int,
) -> None:
    """Load-test a server: latency percentiles and throughput. Sends IMAGES (files or folders), or random ones."""
    if total < 1 or concurrency < 1 or batch < 1:
        raise click.UsageError("--requests, --concurrency and --batch must be at least 1")
    payload: list[Any] = list(walk(images)) if images else [_noise_png(size, seed) for seed in range(8)]
    request = {
        "labels": None if label_set else split(labels),
        "label_set": label_set,
        "method": method,
        "options": json_option(options),
    }
    with api_errors():
        latencies, seconds, failed = asyncio.run(_bench(ctx, payload, request, total, concurrency, batch))
    table = Table(
        "requests",
        "failed",
        "concurrency",
        "images/request",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "requests/s",
        "images/s",
    )
    ordered = sorted(latencies)
    q = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
    table.add_row(
        str(len(latencies)),
        str(failed),
        str(concurrency),
        str(batch),
        *(f"{1000 * v:.1f}" for v in (q[49], q[89], q[98], ordered[-1])),
        f"{len(latencies) / seconds:.2f}",
        f"{len(latencies) * batch / seconds:.2f}",
    )
    Console().print(table)


def _noise_png(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    pixels = bytes(rng.randrange(256) for _ in range(size * size * 3))

    class _Array:  # just enough of an array for array_png
        shape, dtype = (size, size, 3), "uint8"

        def tobytes(self) -> bytes:
            return pixels

    return array_png(_Array())


async def _bench(
    ctx: click.Context, payload: list[Any], request: dict[str, Any], total: int, concurrency: int, batch: int
) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    failed = 0
    sent = 0
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("bench", total=total, rate="")
        async with async_client_of(ctx) as client:

            async def worker() -> None:
                nonlocal sent, failed
                while sent < total:
                    images = [payload[(sent * batch + i) % len(payload)] for i in range(batch)]
                    sent += 1
                    t0 = time.perf_counter()
                    try:
                        await client.classify(images, **request)
                    except TTAError as exc:
                        failed += 1
                        if failed == 1:
                            err.print(f"[yellow]a request failed:[/yellow] {exc}", highlight=False)
                    else:
                        latencies.append(time.perf_counter() - t0)
                    progress.update(
                        task, advance=1, rate=f"{len(latencies) / (time.perf_counter() - started):.1f} req/s"
                    )

            await asyncio.gather(*(worker() for _ in range(concurrency)))
    if not latencies:
        raise click.ClickException(f"all {total} requests failed")
    return latencies, time.perf_counter() - started, failed
