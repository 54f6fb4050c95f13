"""``tta train``: train an adapter on this machine (the server's own training, run as a process), then upload it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from ttaserve_client.cli.common import api_errors, client_of, err


@click.command("train")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="The adapter's name on the server: the upload is its next version.")
@click.option("--group", help="An adapter group, to route or merge it with others later.")
@click.option("--type", "kind", type=click.Choice(["apex", "prompt", "lora"]), default="apex", show_default=True)
@click.option("--steps", type=int, help="Optimisation steps (default 150).")
@click.option("--lr", type=float, help="Learning rate (default 0.002).")
@click.option("--seed", type=int, help="The same images and seed give the same adapter (default 0).")
@click.option("--templates", help="A named template set for the class features (default the server's).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Keep the artifact here too.")
@click.option("--python", "python", default=sys.executable, show_default=True, help="A Python with the server.")
@click.pass_context
def train(
    ctx: click.Context,
    folder: Path,
    name: str,
    group: str | None,
    kind: str,
    steps: int | None,
    lr: float | None,
    seed: int | None,
    templates: str | None,
    output: Path | None,
    python: str,
) -> None:
    """Train an adapter on FOLDER (one sub-folder of images per label, named as the label) with the model the TTA_
    settings name (TTA_MODEL, TTA_PRETRAINED, TTA_DEVICE: the server's), then upload it as --name."""
    if python == sys.executable and importlib.util.find_spec("server") is None:
        raise click.ClickException("training needs the server installed here (pip install ttaserve), or --python")
    with tempfile.TemporaryDirectory() as tmp:
        artifact = output or Path(tmp) / "adapter.safetensors"
        command = [python, "-m", "server.jobs.train_local", str(folder), "--output", str(artifact), "--type", kind]
        for flag, value in (("--steps", steps), ("--lr", lr), ("--seed", seed), ("--templates", templates)):
            if value is not None:
                command += [flag, str(value)]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)  # progress: our stderr
        if done.returncode != 0:
            raise click.ClickException(f"training failed (exit {done.returncode}); see the lines above")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        err.print(f"trained on {len(summary['labels'])} labels: {summary['metrics']}", highlight=False)
        with api_errors(), client_of(ctx) as client:
            stored = client.upload_adapter(artifact, name, group)
    click.echo(json.dumps(stored.model_dump(), indent=2))
