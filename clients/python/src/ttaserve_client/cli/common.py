"""What every ``tta`` command shares: the client from the global options, progress bars, errors as one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ttaserve_client.client import AsyncClient, Client
from ttaserve_client.errors import TTAError

err = Console(stderr=True)


def split(value: str | None) -> list[str] | None:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def json_option(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"steps\": 2}'")
    return parsed


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


def client_of(ctx: click.Context) -> Client:
    return Client(ctx.obj["server"], ctx.obj["timeout_s"], ctx.obj["retries"], api_key=ctx.obj["api_key"])


def async_client_of(ctx: click.Context) -> AsyncClient:
    return AsyncClient(ctx.obj["server"], ctx.obj["timeout_s"], ctx.obj["retries"], api_key=ctx.obj["api_key"])


@contextmanager
def api_errors() -> Iterator[None]:
    """An error from the server (or no answer) ends the command with one line on stderr and exit code 1."""
    try:
        yield
    except TTAError as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise SystemExit(1) from exc
