"""Accuracy of every method on short videos: the moving-shapes set, through the server's classify pipeline.

Each video (``benchmarks/_lib/moving_shapes.py``: one object of a demo class moving across 8 frames;
variants clean, noise and dropout) is one request with ``video.frames``; rows are the variants, columns
zero-shot on the middle frame alone, zero-shot pooled (mean of embeddings, max over logits) and each
adapting method on the clip's spatio-temporal views (mean pooling). Prints a markdown table.

    python -m benchmarks.video_accuracy --videos 64 --views 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._lib import moving_shapes, synthetic
from benchmarks._lib.data import tensors_to_pil
from benchmarks._lib.runners import DirectRunner
from server.service import ClassifyRequest
from server.service.video import VideoInput

ADAPTING = ("tpt", "ctpt", "tps", "zero", "mta")  # ttl re-runs the tower on pixels: it takes no video


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--variants", default=",".join(moving_shapes.VARIANTS))
    parser.add_argument("--videos", type=int, default=32, help="videos per variant")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--methods", default=",".join(ADAPTING), help="adapting methods, comma-separated")
    parser.add_argument("--views", type=int, default=32, help="views per video for the adapting methods")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/video_accuracy.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    runner = DirectRunner(args.model, None, "cpu", batch_size=1, seed=args.seed)
    names = synthetic.CLASS_NAMES
    columns = ["middle frame", "mean", "max", *methods]
    table: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = dict.fromkeys(columns, 0.0)
    try:
        for variant in args.variants.split(","):
            videos, labels = moving_shapes.make_videos(variant, args.videos, args.frames, args.seed)
            correct = dict.fromkeys(columns, 0)
            for i, (video, label) in enumerate(zip(videos, labels.tolist(), strict=True)):
                frames = tensors_to_pil(video)
                requests = {
                    "middle frame": ClassifyRequest(images=[frames[len(frames) // 2]], labels=names),
                    "mean": ClassifyRequest(images=[], labels=names, video=VideoInput(frames, sampling="all")),
                    "max": ClassifyRequest(
                        images=[], labels=names, video=VideoInput(frames, sampling="all", pooling="max")
                    ),
                }
                for method in methods:
                    requests[method] = ClassifyRequest(
                        images=[],
                        labels=names,
                        video=VideoInput(frames, sampling="all"),
                        method=method,
                        options={"views": args.views},
                        seed=args.seed + i,
                    )
                for column, request in requests.items():
                    started = time.perf_counter()
                    result = runner.send(request)[0]
                    seconds[column] += time.perf_counter() - started
                    correct[column] += result["label"] == names[label]
            table[variant] = {c: 100.0 * correct[c] / args.videos for c in columns}
            print(f"{variant}: " + ", ".join(f"{c} {v:.1f}" for c, v in table[variant].items()), flush=True)
    finally:
        runner.close()
    n = args.videos * len(table)
    lines = [
        f"| variant ({args.videos} videos x {args.frames} frames) | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
        *(f"| {v} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |" for v, row in table.items()),
        "| mean | " + " | ".join(f"{sum(r[c] for r in table.values()) / len(table):.1f}" for c in columns) + " |",
        "| ms per video | " + " | ".join(f"{1000 * seconds[c] / n:.0f}" for c in columns) + " |",
    ]
    print("\n".join(lines))
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "accuracy": table, "seconds": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
