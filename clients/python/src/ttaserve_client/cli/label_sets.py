"""``tta label-sets`` and ``tta calibrate``: what is stored on the server for a set of labels."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ttaserve_client.cli.common import api_errors, client_of, err, progress_bar, split
from ttaserve_client.client import Client
from ttaserve_client.images import walk
from ttaserve_client.models import Calibration


@click.group("label-sets")
def label_sets() -> None:
    """List, create, show and delete stored label sets."""


@label_sets.command("list")
@click.pass_context
def label_sets_list(ctx: click.Context) -> None:
    """Every label set: the model's and the stored ones."""
    with api_errors(), client_of(ctx) as client:
        sets = client.label_sets()
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
    names = split(labels) if labels else None
    if labels_file is not None:
        names = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    if not names:
        raise click.UsageError("give --labels a,b,c or --labels-file FILE")
    template_arg: list[str] | str | None = templates.split("|") if templates and "|" in templates else templates
    described = json.loads(descriptions.read_text()) if descriptions else None
    with api_errors(), client_of(ctx) as client:
        created = client.create_label_set(name, names, template_arg, described)
    click.echo(json.dumps(created.model_dump(), indent=2))


@label_sets.command("show")
@click.argument("name")
@click.pass_context
def label_sets_show(ctx: click.Context, name: str) -> None:
    """One label set, as JSON."""
    with api_errors(), client_of(ctx) as client:
        click.echo(json.dumps(client.label_set(name).model_dump(), indent=2))


@label_sets.command("delete")
@click.argument("name")
@click.pass_context
def label_sets_delete(ctx: click.Context, name: str) -> None:
    """Delete a stored label set (and its calibration)."""
    with api_errors(), client_of(ctx) as client:
        client.delete_label_set(name)
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


@click.command()
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
    with api_errors(), client_of(ctx) as client:
        status = client.calibrate(label_set, images, labels, split(methods))
        if wait:
            status = _follow(client, label_set)
    _print_calibration(status)
    if status.fit is not None and status.fit.state == "failed":
        raise SystemExit(1)


def _follow(client: Client, label_set: str) -> Calibration:
    with progress_bar() as progress:
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
