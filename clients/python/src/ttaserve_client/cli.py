"""``tta``: TTAServe from the command line.

    tta classify photos/ --labels cat,dog,bird --method tpt --concurrency 4 --format csv > out.csv
    tta label-sets create animals --labels cat,dog,bird
    tta calibrate animals labelled/            # one sub-folder per label
    tta bench --requests 200 --concurrency 8
    tta serve --port 8000                      # the server, when it is installed

The server is ``--server`` or ``TTA_SERVER`` (default http://127.0.0.1:8000), its API key ``--api-key`` or
``TTA_API_KEY`` (prefer the variable: a flag shows in the process list). Progress and summaries go
to stderr, results to stdout (or ``--output``), so the output pipes cleanly.
"""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

try:
    import click
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table
except ImportError as exc:  # the client alone does not bring the command line's dependencies
    raise SystemExit("the tta command needs its extras: pip install 'ttaserve-client[cli]'") from exc

from ttaserve_client.client import DEFAULT_URL, AsyncClient, Client
from ttaserve_client.errors import TTAError
from ttaserve_client.images import IMAGE_SUFFIXES, array_png, walk
from ttaserve_client.models import Calibration, Classification

err = Console(stderr=True)
FORMATS = ("table", "jsonl", "csv")


def _split(value: str | None) -> list[str] | None:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def _json_option(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"steps\": 2}'")
    return parsed


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--server", envvar="TTA_SERVER", default=DEFAULT_URL, show_default=True, help="The server's URL.")
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True, help="Seconds per request.")
@click.option("--retries", type=int, default=3, show_default=True, help="Tries after the first, with backoff.")
@click.option(
    "--api-key", envvar="TTA_API_KEY", default=None, help="The server's API key (sent as Authorization: Bearer)."
)
@click.pass_context
def main(ctx: click.Context, server: str, timeout_s: float, retries: int, api_key: str | None) -> None:
    """TTAServe from the command line: classify files and folders, manage label sets, calibrate, load-test."""
    ctx.obj = {"server": server, "timeout_s": timeout_s, "retries": retries, "api_key": api_key or None}


def _client(ctx: click.Context) -> Client:
    return Client(ctx.obj["server"], ctx.obj["timeout_s"], ctx.obj["retries"], api_key=ctx.obj["api_key"])


def _async_client(ctx: click.Context) -> AsyncClient:
    return AsyncClient(ctx.obj["server"], ctx.obj["timeout_s"], ctx.obj["retries"], api_key=ctx.obj["api_key"])


def _fail(exc: Exception) -> None:
    err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
    raise SystemExit(1)


def _batches(items: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class _Writer:
    """Rows of results as JSON lines, CSV or (once all are in) a table."""

    def __init__(self, fmt: str, out: TextIO):
        self.fmt, self.out = fmt, out
        self.rows: list[dict[str, Any]] = []  # the table's, printed once all are in
        self.csv: csv.DictWriter[str] | None = None

    def add(self, path: Path, answer: Classification, index: int) -> None:
        result = answer.results[index]
        row = {
            "path": str(path),
            "label": result.label,
            "confidence": round(result.confidence, 4),
            "none_of_these": round(result.none_of_these, 4),
            "method": result.adaptation.method,
            "changed": result.adaptation.changed,
            "skipped": result.adaptation.skipped,
            "request_id": answer.request_id,
        }
        if self.fmt == "jsonl":
            self.out.write(json.dumps({**row, "result": result.model_dump()}) + "\n")
        elif self.fmt == "csv":
            if self.csv is None:
                self.csv = csv.DictWriter(self.out, fieldnames=list(row))
                self.csv.writeheader()
            self.csv.writerow(row)
        else:
            self.rows.append(row)
        self.out.flush()

    def close(self) -> None:
        if self.fmt != "table" or not self.rows:
            return
        table = Table("path", "label", "confidence", "none of these", "method", "changed")
        for row in self.rows:
            label = row["label"] if row["label"] is not None else "(abstained)"
            table.add_row(
                row["path"],
                label,
                f"{row['confidence']:.3f}",
                f"{row['none_of_these']:.3f}",
                row["method"],
                "yes" if row["changed"] else "",
            )
        # Piped or written to a file, rows are not wrapped (paths stay whole); on a terminal they fit its width.
        Console(file=self.out, width=None if self.out.isatty() else 100_000).print(table)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--labels", help="Comma-separated labels.")
@click.option("--label-set", help="A stored label set, instead of --labels.")
@click.option("--method", help="Test-time method (tta methods lists them); default the server's.")
@click.option("--options", help="The method's options as JSON, e.g. '{\"steps\": 2}'.")
@click.option("--templates", help="A named template set (simple, openai_imagenet, ensemble7).")
@click.option("--top-k", type=int, help="Predictions per image.")
@click.option("--abstain-below", type=float, help="No label when the calibrated confidence is lower.")
@click.option("--seed", type=int, help="Seed of the augmented views.")
@click.option("--batch", type=int, default=8, show_default=True, help="Images per request.")
@click.option("--concurrency", "-c", type=int, default=4, show_default=True, help="Requests in flight.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not stdout.")
@click.pass_context
def classify(
    ctx: click.Context,
    paths: tuple[Path, ...],
    labels: str | None,
    label_set: str | None,
    method: str | None,
    options: str | None,
    templates: str | None,
    top_k: int | None,
    abstain_below: float | None,
    seed: int | None,
    batch: int,
    concurrency: int,
    fmt: str,
    output: Path | None,
) -> None:
    """Classify image files and folders (searched recursively for image files)."""
    if (labels is None) == (label_set is None):
        raise click.UsageError("give --labels a,b,c or --label-set NAME")
    if batch < 1 or concurrency < 1:
        raise click.UsageError("--batch and --concurrency must be at least 1")
    files = list(walk(paths))
    if not files:
        raise click.UsageError(
            f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(map(str, paths))}"
        )
    request = {
        "labels": _split(labels),
        "label_set": label_set,
        "method": method,
        "options": _json_option(options),
        "templates": templates,
        "top_k": top_k,
        "abstain_below": abstain_below,
        "seed": seed,
    }
    out = output.open("w", newline="") if output else sys.stdout
    writer = _Writer(fmt, out)
    try:
        done, seconds = asyncio.run(_classify_all(ctx, files, request, batch, concurrency, writer))
    except TTAError as exc:
        _fail(exc)
    finally:
        writer.close()
        if output:
            out.close()
    err.print(
        f"{done} images in {seconds:.2f} s: {done / seconds:.1f} images/s "
        f"({batch} per request, {concurrency} in flight)",
        highlight=False,
    )


async def _classify_all(
    ctx: click.Context, files: list[Path], request: dict[str, Any], batch: int, concurrency: int, writer: _Writer
) -> tuple[int, float]:
    """Send ``files`` in batches with at most ``concurrency`` requests in flight; write each answer as it comes."""
    queue: asyncio.Queue[list[Path]] = asyncio.Queue()
    for chunk in _batches(files, batch):
        queue.put_nowait(chunk)
    started = time.perf_counter()
    done = 0
    with _progress() as progress:
        task = progress.add_task("classify", total=len(files), rate="")
        async with _async_client(ctx) as client:

            async def worker() -> None:
                nonlocal done
                while not queue.empty():
                    chunk = queue.get_nowait()
                    answer = await client.classify(chunk, **request)
                    for i, path in enumerate(chunk):
                        writer.add(path, answer, i)
                    done += len(chunk)
                    rate = done / (time.perf_counter() - started)
                    progress.update(task, advance=len(chunk), rate=f"{rate:.1f} img/s")

            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, time.perf_counter() - started


@main.group("label-sets")
def label_sets() -> None:
    """List, create, show and delete stored label sets."""


@label_sets.command("list")
@click.pass_context
def label_sets_list(ctx: click.Context) -> None:
    """Every label set: the model's and the stored ones."""
    try:
        with _client(ctx) as client:
            sets = client.label_sets()
    except TTAError as exc:
        _fail(exc)
    table = Table("name", "labels", "source", "first labels")
    for s in sets:
        table.add_row(
            s.name, str(len(s.labels)), s.source, ", ".join(s.labels[:4]) + (" ..." if len(s.labels) > 4 else "")
        )
    Console().print(table)


@label_sets.command("create")
@click.argument("name")
@click.option("--labels", help="Comma-separated labels.")
@click.option("--labels-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="One label per line.")
@click.option("--templates", help="A named template set, or templates separated by '|' with {} for the label.")
@click.option(
    "--descriptions",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A JSON file: {label: [phrases]}.",
)
@click.pass_context
def label_sets_create(
    ctx: click.Context,
    name: str,
    labels: str | None,
    labels_file: Path | None,
    templates: str | None,
    descriptions: Path | None,
) -> None:
    """Store a label set NAME."""
    names = _split(labels) if labels else None
    if labels_file is not None:
        names = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    if not names:
        raise click.UsageError("give --labels a,b,c or --labels-file FILE")
    template_arg: list[str] | str | None = templates.split("|") if templates and "|" in templates else templates
    described = json.loads(descriptions.read_text()) if descriptions else None
    try:
        with _client(ctx) as client:
            created = client.create_label_set(name, names, template_arg, described)
    except TTAError as exc:
        _fail(exc)
    click.echo(json.dumps(created.model_dump(), indent=2))


@label_sets.command("show")
@click.argument("name")
@click.pass_context
def label_sets_show(ctx: click.Context, name: str) -> None:
    """One label set, as JSON."""
    try:
        with _client(ctx) as client:
            click.echo(json.dumps(client.label_set(name).model_dump(), indent=2))
    except TTAError as exc:
        _fail(exc)


@label_sets.command("delete")
@click.argument("name")
@click.pass_context
def label_sets_delete(ctx: click.Context, name: str) -> None:
    """Delete a stored label set (and its calibration)."""
    try:
        with _client(ctx) as client:
            client.delete_label_set(name)
    except TTAError as exc:
        _fail(exc)
    err.print(f"deleted {name}", highlight=False)


def _labelled(folder: Path) -> tuple[list[Path], list[str]]:
    """An ImageFolder: each sub-folder is a label, its image files (recursively) are images of it."""
    images: list[Path] = []
    labels: list[str] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        found = list(walk([sub]))
        images += found
        labels += [sub.name] * len(found)
    return images, labels


@main.command()
@click.argument("label_set")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--methods", help="Comma-separated methods to calibrate (default zero_shot).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow the fit until it ends.")
@click.pass_context
def calibrate(ctx: click.Context, label_set: str, folder: Path, methods: str | None, wait: bool) -> None:
    """Calibrate LABEL_SET on labelled images: FOLDER has one sub-folder per label, named as the label."""
    images, labels = _labelled(folder)
    if not images:
        raise click.UsageError(f"no labelled images in {folder}: it needs one sub-folder of images per label")
    err.print(f"{len(images)} images of {len(set(labels))} labels from {folder}", highlight=False)
    try:
        with _client(ctx) as client:
            status = client.calibrate(label_set, images, labels, _split(methods))
            if wait:
                status = _follow(client, label_set)
    except TTAError as exc:
        _fail(exc)
    _print_calibration(status)
    if status.fit is not None and status.fit.state == "failed":
        raise SystemExit(1)


def _follow(client: Client, label_set: str) -> Calibration:
    with _progress() as progress:
        task = progress.add_task("calibrate", total=None, rate="")

        def show(status: Calibration) -> None:
            if status.fit is not None:
                progress.update(task, total=status.fit.total, completed=status.fit.done, rate=status.fit.state)

        return client.wait_calibration(label_set, progress=show)


def _print_calibration(status: Calibration) -> None:
    if status.fit is not None and status.fit.error:
        err.print(f"[red]the fit failed:[/red] {status.fit.error}", highlight=False)
    table = Table("method", "images", "applies", "held-out accuracy %", "ECE % raw", "before", "after")
    for fitted in status.calibrations:
        ece = fitted.held_out.ece
        table.add_row(
            fitted.method,
            str(fitted.images),
            "yes" if fitted.applies else "no",
            f"{fitted.held_out.accuracy:.1f}",
            *(f"{ece.get(k, float('nan')):.1f}" for k in ("raw", "before", "after")),
        )
    Console().print(table)


@main.command()
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
        "labels": None if label_set else _split(labels),
        "label_set": label_set,
        "method": method,
        "options": _json_option(options),
    }
    try:
        latencies, seconds, failed = asyncio.run(_bench(ctx, payload, request, total, concurrency, batch))
    except TTAError as exc:
        _fail(exc)
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
    with _progress() as progress:
        task = progress.add_task("bench", total=total, rate="")
        async with _async_client(ctx) as client:

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


@main.command("methods")
@click.pass_context
def methods_command(ctx: click.Context) -> None:
    """The test-time methods the server offers."""
    try:
        with _client(ctx) as client:
            info = client.methods()
    except TTAError as exc:
        _fail(exc)
    table = Table("method", "summary")
    for m in info.methods:
        table.add_row(m.name + (" (default)" if m.name == info.default else ""), m.summary)
    Console().print(table)


@main.command("models")
@click.pass_context
def models_command(ctx: click.Context) -> None:
    """The loaded model, as JSON."""
    try:
        with _client(ctx) as client:
            click.echo(json.dumps([m.model_dump() for m in client.models()], indent=2))
    except TTAError as exc:
        _fail(exc)


@main.command(
    add_help_option=False, context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(args: tuple[str, ...]) -> None:
    """Start the server here: python -m server ARGS (tta serve --help lists them)."""
    if importlib.util.find_spec("server") is None or importlib.util.find_spec("server.api") is None:
        raise click.ClickException("the server is not installed here: pip install ttaserve (with torch)")
    os.execv(sys.executable, [sys.executable, "-m", "server", *args])
