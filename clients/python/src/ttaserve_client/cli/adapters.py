"""``tta adapters``: the few-shot adapters your key keeps on the server: list, upload, download, delete, merge."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ttaserve_client.cli.common import api_errors, client_of, err


@click.group("adapters")
def adapters() -> None:
    """List, upload, show, download, delete and merge stored adapters."""


@adapters.command("list")
@click.pass_context
def adapters_list(ctx: click.Context) -> None:
    """Every version of your adapters, and which the server holds loaded."""
    with api_errors(), client_of(ctx) as client:
        listed = client.adapters()
    table = Table("ref", "type", "labels", "group", "source", "bytes", "resident")
    for a in listed.adapters:
        table.add_row(
            a.ref, a.type, str(len(a.labels)), a.group or "", a.source, str(a.bytes), "yes" if a.resident else ""
        )
    Console().print(table)
    err.print(f"{listed.resident_bytes} bytes loaded of a {listed.cache_bytes}-byte cache", highlight=False)


@adapters.command("upload")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="The adapter's name: the upload is its next version.")
@click.option("--group", help="An adapter group, to merge it with others later.")
@click.pass_context
def adapters_upload(ctx: click.Context, artifact: Path, name: str, group: str | None) -> None:
    """Store an adapter artifact (.safetensors) as the next version of --name."""
    with api_errors(), client_of(ctx) as client:
        stored = client.upload_adapter(artifact, name, group)
    click.echo(json.dumps(stored.model_dump(), indent=2))


@adapters.command("show")
@click.argument("ref")
@click.pass_context
def adapters_show(ctx: click.Context, ref: str) -> None:
    """One adapter version (NAME@vN) or the newest of NAME, as JSON."""
    with api_errors(), client_of(ctx) as client:
        click.echo(json.dumps(client.adapter(ref).model_dump(), indent=2))


@adapters.command("download")
@click.argument("ref")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Write it here.")
@click.pass_context
def adapters_download(ctx: click.Context, ref: str, output: Path) -> None:
    """Save an adapter's artifact file, to upload it to another server running the same model."""
    with api_errors(), client_of(ctx) as client:
        output.write_bytes(client.download_adapter(ref))
    err.print(f"wrote {output}", highlight=False)


@adapters.command("delete")
@click.argument("ref")
@click.pass_context
def adapters_delete(ctx: click.Context, ref: str) -> None:
    """Delete one version (NAME@vN) or every version of NAME."""
    with api_errors(), client_of(ctx) as client:
        client.delete_adapter(ref)
    err.print(f"deleted {ref}", highlight=False)


@adapters.command("merge")
@click.argument("group")
@click.option("--method", type=click.Choice(["emr", "ties", "task_arithmetic"]), default="emr", show_default=True)
@click.option("--scale", type=float, help="task_arithmetic and ties: the merged update's scale.")
@click.option("--density", type=float, help="ties: the share of each member's entries kept.")
@click.option("--name", help="The unified adapter's name (default GROUP.merged).")
@click.pass_context
def adapters_merge(
    ctx: click.Context, group: str, method: str, scale: float | None, density: float | None, name: str | None
) -> None:
    """Merge the newest version of each adapter of GROUP into one adapter."""
    with api_errors(), client_of(ctx) as client:
        merged = client.merge_adapters(group, method, scale=scale, density=density, name=name)
    click.echo(json.dumps(merged.model_dump(), indent=2))
