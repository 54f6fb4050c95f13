"""``tta classify``: image files and folders, in batches with requests in flight, written as a table, JSON lines
or CSV."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import click
from rich.console import Console
from rich.table import Table

from ttaserve_client.cli.common import api_errors, async_client_of, err, json_option, progress_bar, split
from ttaserve_client.images import IMAGE_SUFFIXES, walk
from ttaserve_client.models import Classification

FORMATS = ("table", "jsonl", "csv")


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


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--labels", help="Comma-separated labels.")
@click.option("--label-set", help="A stored label set, instead of --labels.")
@click.option("--method", help="Test-time method (tta methods lists them); default the server's.")
@click.option("--options", help="The method's options as JSON, e.g. '{\"steps\": 2}'.")
@click.option("--templates", help="A named template set (simple, openai_imagenet, ensemble7).")
@click.option("--top-k", type=int, help="Predictions per image.")
@click.option("--abstain-below", type=float, help="No label when the calibrated confidence is lower.")
@click.option("--seed", type=int, help="Seed of the augmented views.")
@click.option("--adapter", help="A stored adapter, NAME or NAME@vN; 'auto' routes each image to its closest adapters.")
@click.option("--adapter-alpha", help="0 to 1 (0: exactly zero-shot, 1: the adapter), or class_distance.")
@click.option("--session", help="Keep online state across these requests under this session id (zero_shot).")
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
    adapter: str | None,
    adapter_alpha: str | None,
    session: str | None,
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
        "labels": split(labels),
        "label_set": label_set,
        "method": method,
        "options": json_option(options),
        "templates": templates,
        "top_k": top_k,
        "abstain_below": abstain_below,
        "seed": seed,
        "adapter": {"route": "auto"} if adapter == "auto" else adapter,
        "adapter_alpha": _alpha(adapter_alpha),
        "session": session,
    }
    out = output.open("w", newline="") if output else sys.stdout
    writer = _Writer(fmt, out)
    try:
        with api_errors():
            done, seconds = asyncio.run(_classify_all(ctx, files, request, batch, concurrency, writer))
    finally:
        writer.close()
        if output:
            out.close()
    err.print(
        f"{done} images in {seconds:.2f} s: {done / seconds:.1f} images/s "
        f"({batch} per request, {concurrency} in flight)",
        highlight=False,
    )


def _alpha(value: str | None) -> float | str | None:
    if value is None or value == "class_distance":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.UsageError(
            f"--adapter-alpha must be a number from 0 to 1 or class_distance, not {value!r}"
        ) from None


async def _classify_all(
    ctx: click.Context, files: list[Path], request: dict[str, Any], batch: int, concurrency: int, writer: _Writer
) -> tuple[int, float]:
    """Send ``files`` in batches with at most ``concurrency`` requests in flight; write each answer as it comes."""
    queue: asyncio.Queue[list[Path]] = asyncio.Queue()
    for chunk in _batches(files, batch):
        queue.put_nowait(chunk)
    started = time.perf_counter()
    done = 0
    with progress_bar() as progress:
        task = progress.add_task("classify", total=len(files), rate="")
        async with async_client_of(ctx) as client:

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
