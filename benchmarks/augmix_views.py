"""Accuracy of the view-making methods with and without AugMix views, on the demo model's shift suite.

For each shift and method, top-1 with ``augmentation: "crop_flip"`` (TPT's ImageNet views, our default)
and ``"augmix"`` (the official TPT's fine-grained views, ``adapters/augmix.py``), through the server's
classify pipeline on the same images and seeds; zero-shot alongside. Prints a markdown table.

    python -m benchmarks.augmix_views --max-samples 100 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._lib.data import synthetic_subsets
from benchmarks._lib.runners import DirectRunner

SHIFTS = "clean,heldout,gaussian_noise,defocus_blur,contrast,pixelate,jpeg,style"
AUGMENTATIONS = ("crop_flip", "augmix")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--methods", default="tpt,tps,zero,mta")
    parser.add_argument("--shifts", default=SHIFTS)
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--max-samples", type=int, default=100, help="images per shift")
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/augmix_views.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    subsets = synthetic_subsets(args.shifts.split(","), [args.severity], args.max_samples, args.seed)
    runner = DirectRunner(args.model, None, "cpu", args.batch_size, args.seed)
    table: dict[str, dict[str, float]] = {}
    seconds = dict.fromkeys(AUGMENTATIONS, 0.0)
    try:
        for subset in subsets:
            zero_shot = runner.run(subset, "zero_shot", {}).pred
            row = {"zero_shot": 100.0 * float((zero_shot == subset.labels).float().mean())}
            for method in methods:
                for aug in AUGMENTATIONS:
                    started = time.perf_counter()
                    out = runner.run(subset, method, {"views": args.views, "augmentation": aug})
                    seconds[aug] += time.perf_counter() - started
                    row[f"{method} {aug}"] = 100.0 * float((out.pred == subset.labels).float().mean())
            table[subset.title] = row
            print(subset.title, json.dumps({k: round(v, 1) for k, v in row.items()}), flush=True)
    finally:
        runner.close()
    head = ["zero_shot"] + [f"{m} {a}" for m in methods for a in AUGMENTATIONS]
    lines = [
        f"| shift ({args.max_samples} images) | zero-shot | "
        + " | ".join(f"{m} | {m} +AugMix" for m in methods)
        + " |",
        "| --- | " + " | ".join("---:" for _ in head) + " |",
        *(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in head) + " |" for name, row in table.items()),
        "| mean | " + " | ".join(f"{sum(r[c] for r in table.values()) / len(table):.1f}" for c in head) + " |",
    ]
    n = args.max_samples * len(table) * len(methods)
    lines.append(
        f"\nms per image, all methods: crop_flip {1000 * seconds['crop_flip'] / n:.0f}, "
        f"augmix {1000 * seconds['augmix'] / n:.0f}"
    )
    print("\n".join(lines))
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "accuracy": table, "seconds": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
