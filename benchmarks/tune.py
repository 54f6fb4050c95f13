"""Choose each gradient method's learning rate and step count on the clean validation split.

Never on the test shifts: the validation split is the synthetic ``val`` split (seen compositions,
no corruption), or a labelled folder. Prints the grid, and the chosen options as ``--options`` flags
for benchmarks/accuracy.py; ties keep the paper's defaults.

    python -m benchmarks.tune --model demo --max-samples 200
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from benchmarks._lib import synthetic
from benchmarks._lib.data import Subset, tensors_to_pil
from benchmarks._lib.runners import DirectRunner

GRADIENT_METHODS = ("tpt", "ctpt", "tps", "ttl")
LRS = (5e-3, 5e-2, 5e-1)
STEPS = (1, 3)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=",".join(GRADIENT_METHODS))
    parser.add_argument("--max-samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    batch = synthetic.make_split("val", args.max_samples, args.seed)
    subset = Subset(
        "val", tensors_to_pil(batch.images), batch.labels, synthetic.CLASS_NAMES, synthetic.TEMPLATES, corruption=False
    )
    runner = DirectRunner(args.model, args.pretrained, args.device, 64, args.seed)
    chosen: dict[str, dict[str, float]] = {}
    print(f"model: {runner.description}; {len(subset.images)} clean validation images", flush=True)
    try:
        for method in args.methods.split(","):
            scores = {}
            for lr, steps in itertools.product(LRS, STEPS):
                out = runner.run(subset, method, {"lr": lr, "steps": steps})
                scores[(lr, steps)] = float((out.pred == subset.labels).float().mean() * 100)
                print(f"{method:5s} lr={lr:<6g} steps={steps}: top-1 {scores[(lr, steps)]:.1f}%", flush=True)
            default = (5e-3, 1)
            best = max(scores, key=lambda k: (scores[k], k == default))
            chosen[method] = {"lr": best[0], "steps": best[1]}
    finally:
        runner.close()
    flags = " ".join(f"--options '{m}={json.dumps(o)}'" for m, o in chosen.items())
    print(f"chosen on clean validation: {flags}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(chosen, indent=2))
    return chosen


if __name__ == "__main__":
    main()
