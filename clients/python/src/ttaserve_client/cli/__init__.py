"""``tta``: TTAServe from the command line.

    tta classify photos/ --labels cat,dog,bird --method tpt --concurrency 4 --format csv > out.csv
    tta classify-video clip.mp4 frames/ --labels cat,dog,bird --num-frames 8   # a video file, a folder of frames
    tta label-sets create animals --labels cat,dog,bird
    tta calibrate animals labelled/            # one sub-folder per label
    tta adapters upload shapes.safetensors --name shapes && tta classify photos/ --labels a,b --adapter shapes
    tta train labelled/ --name shapes --steps 150   # train here (one sub-folder per label), then upload
    tta bench --requests 200 --concurrency 8
    tta serve --port 8000                      # the server, when it is installed

The server is ``--server`` or ``TTA_SERVER`` (default http://127.0.0.1:8000), its API key ``--api-key`` or
``TTA_API_KEY`` (prefer the variable: a flag shows in the process list). Progress and summaries go
to stderr, results to stdout (or ``--output``), so the output pipes cleanly.
"""

from __future__ import annotations

try:
    import click
    import rich  # noqa: F401  (every command prints with it)
except ImportError as exc:  # the client alone does not bring the command line's dependencies
    raise SystemExit("the tta command needs its extras: pip install 'ttaserve-client[cli]'") from exc

from ttaserve_client.cli.adapters import adapters
from ttaserve_client.cli.bench import bench
from ttaserve_client.cli.classify import classify
from ttaserve_client.cli.info import methods_command, models_command, serve
from ttaserve_client.cli.label_sets import calibrate, label_sets
from ttaserve_client.cli.train import train
from ttaserve_client.cli.video import classify_video
from ttaserve_client.client import DEFAULT_URL


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


commands = (
    classify,
    classify_video,
    label_sets,
    calibrate,
    adapters,
    train,
    bench,
    methods_command,
    models_command,
    serve,
)
for command in commands:
    main.add_command(command)

__all__ = ["main"]
