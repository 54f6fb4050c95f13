"""``tta methods``, ``tta models`` and ``tta serve``."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import click
from rich.console import Console
from rich.table import Table

from ttaserve_client.cli.common import api_errors, client_of


@click.command("methods")
@click.pass_context
def methods_command(ctx: click.Context) -> None:
    """The test-time methods the server offers."""
    with api_errors(), client_of(ctx) as client:
        info = client.methods()
    table = Table("method", "summary")
    for m in info.methods:
        table.add_row(m.name + (" (default)" if m.name == info.default else ""), m.summary)
    Console().print(table)


@click.command("models")
@click.pass_context
def models_command(ctx: click.Context) -> None:
    """The loaded model, as JSON."""
    with api_errors(), client_of(ctx) as client:
        click.echo(json.dumps([m.model_dump() for m in client.models()], indent=2))


@click.command(
    add_help_option=False, context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(args: tuple[str, ...]) -> None:
    """Start the server here: python -m server ARGS (tta serve --help lists them)."""
    if importlib.util.find_spec("server") is None or importlib.util.find_spec("server.api") is None:
        raise click.ClickException("the server is not installed here: pip install ttaserve (with torch)")
    os.execv(sys.executable, [sys.executable, "-m", "server", *args])
