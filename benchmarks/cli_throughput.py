"""``tta classify`` over a folder against the server's own zero-shot throughput.

One process starts a server on loopback (the demo model by default) and writes ``--images`` demo images
(the synthetic test split, PNG) to a folder. Then, alternately, in rounds: (a) ``direct``: the engine's
batched forward on the same images, no server; (b) ``http``: the images POSTed by in-process async
clients, ``--batch`` per request, ``--concurrency`` in flight, as raw JSON (the serving baseline);
(c) ``cli``: ``tta classify FOLDER`` as a user runs it (a subprocess: reading the files, multipart
uploads, the progress bar, CSV written to a file) with the same batch and concurrency. It prints each
rate, the ratios cli/http and cli/direct, and the throughput line ``tta`` printed itself.

    python -m benchmarks.cli_throughput --model demo --images 200 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import uvicorn
from ttaserve_client import Client

from benchmarks._lib.data import synthetic_subsets
from benchmarks.zero_shot_throughput import run_direct, run_http
from server.api import create_app
from server.settings import Settings


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8, help="images per request (tta classify --batch)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (tta classify -c)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    (subset,) = synthetic_subsets(["clean"], [0], args.images, seed=0)
    labels = subset.class_names
    workdir = Path(tempfile.mkdtemp(prefix="tta-cli-bench-"))
    folder = workdir / "images"
    folder.mkdir()
    pngs = []
    for i, image in enumerate(subset.images):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        pngs.append(buf.getvalue())
        (folder / f"{i:04d}.png").write_bytes(pngs[-1])

    settings = Settings(
        model=args.model, device="cpu", port=args.port, torch_threads=args.threads, request_timeout_s=600,
        log_level="warning", data_dir=workdir / "data", _env_file=None,
    )  # fmt: skip
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{args.port}"
    with Client(url) as client:
        if not client.wait_ready(600):
            raise SystemExit("the server did not become ready")
    engine = app.state.runtime.engine
    print(f"model {args.model}, {args.images} images of {len(labels)} labels, batch {args.batch}, "
          f"concurrency {args.concurrency}, server threads {args.threads}", flush=True)  # fmt: skip

    def cli() -> tuple[float, str]:
        command = [sys.executable, "-m", "ttaserve_client", "--server", url, "classify", str(folder),
                   "--labels", ",".join(labels), "--batch", str(args.batch), "--concurrency", str(args.concurrency),
                   "--format", "csv", "--output", str(workdir / "out.csv")]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        elapsed = time.perf_counter() - started
        rows = (workdir / "out.csv").read_text().count("\n") - 1
        if rows != args.images:
            raise SystemExit(f"tta wrote {rows} rows for {args.images} images:\n{done.stderr}")
        printed = next(line for line in done.stderr.splitlines() if re.search(r"images in .* images/s", line))
        return args.images / elapsed, printed

    run_direct(engine, pngs[: args.batch], args.batch, labels)  # warm-up
    asyncio.run(run_http(url, pngs[: args.batch * 2], 2, labels, args.batch))
    direct, http, command, own = [], [], [], []
    for r in range(args.rounds):
        direct.append(run_direct(engine, pngs, args.batch, labels))
        http.append(asyncio.run(run_http(url, pngs, args.concurrency, labels, args.batch))[0])
        rate, printed = cli()
        command.append(rate)
        own.append(float(re.findall(r"([\d.]+) images/s", printed)[0]))
        print(f"round {r + 1}: direct {direct[-1]:.1f} img/s, http {http[-1]:.1f} img/s, tta classify {rate:.1f} "
              f"img/s (whole command, start-up included; it printed: {printed})", flush=True)  # fmt: skip
    server.should_exit = True
    thread.join(30)
    result = {
        "direct_images_per_s": statistics.mean(direct),
        "http_images_per_s": statistics.mean(http),
        "cli_images_per_s": statistics.mean(command),
        "cli_printed_images_per_s": statistics.mean(own),
    }
    print(f"direct batched forward: {result['direct_images_per_s']:.1f} img/s")
    print(f"server over HTTP (in-process clients): {result['http_images_per_s']:.1f} img/s")
    print(f"tta classify, whole command: {result['cli_images_per_s']:.1f} img/s; as it printed (requests only): "
          f"{result['cli_printed_images_per_s']:.1f} img/s")  # fmt: skip
    print(f"ratios: tta/http {result['cli_images_per_s'] / result['http_images_per_s']:.2f} (printed "
          f"{result['cli_printed_images_per_s'] / result['http_images_per_s']:.2f}), "
          f"tta/direct {result['cli_images_per_s'] / result['direct_images_per_s']:.2f}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
