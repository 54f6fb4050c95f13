"""``tta classify-video``: folders of frames and video files, one request and one result row each."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ttaserve_client.cli.classify import FORMATS, _Writer
from ttaserve_client.cli.common import api_errors, client_of, err, json_option, split


@click.command("classify-video")
@click.argument("videos", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--labels", help="Comma-separated labels.")
@click.option("--label-set", help="A stored label set, instead of --labels.")
@click.option("--num-frames", type=int, help="Frames to sample from each video (the server's default: 8).")
@click.option(
    "--sampling",
    type=click.Choice(["segment", "uniform", "all"]),
    help="segment: each segment's centre frame (default); uniform: evenly spaced; all: every frame.",
)
@click.option(
    "--pooling",
    type=click.Choice(["mean", "max"]),
    help="mean: of the frames' embeddings (default); max: over their logits (zero_shot only).",
)
@click.option("--method", help="Test-time method (tta methods lists them); default the server's.")
@click.option("--options", help="The method's options as JSON, e.g. '{\"views\": 32}'.")
@click.option("--templates", help="A named template set (simple, openai_imagenet, ensemble7).")
@click.option("--top-k", type=int, help="Predictions per video.")
@click.option("--seed", type=int, help="Seed of the augmented views.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not stdout.")
@click.pass_context
def classify_video(
    ctx: click.Context,
    videos: tuple[Path, ...],
    labels: str | None,
    label_set: str | None,
    num_frames: int | None,
    sampling: str | None,
    pooling: str | None,
    method: str | None,
    options: str | None,
    templates: str | None,
    top_k: int | None,
    seed: int | None,
    fmt: str,
    output: Path | None,
) -> None:
    """Classify videos: each VIDEO is a folder of frames (image files, in natural name order) or a video file."""
    if (labels is None) == (label_set is None):
        raise click.UsageError("give --labels a,b,c or --label-set NAME")
    out = output.open("w", newline="") if output else sys.stdout
    writer = _Writer(fmt, out)
    started = time.perf_counter()
    try:
        with api_errors(), client_of(ctx) as client:
            for video in videos:
                try:
                    answer = client.classify_video(
                        video,
                        split(labels),
                        num_frames=num_frames,
                        sampling=sampling,
                        pooling=pooling,
                        label_set=label_set,
                        templates=templates,
                        top_k=top_k,
                        method=method,
                        options=json_option(options),
                        seed=seed,
                    )
                except ValueError as exc:  # a folder without frames
                    raise click.UsageError(str(exc)) from exc
                writer.add(video, answer, 0)
    finally:
        writer.close()
        if output:
            out.close()
    err.print(f"{len(videos)} videos in {time.perf_counter() - started:.2f} s", highlight=False)
