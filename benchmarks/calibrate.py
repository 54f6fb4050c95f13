"""Fit the calibration temperature of each method on labelled data, and store it with the model.

Temperature scaling (Guo et al., 2017): one scalar T per (model, method) that minimises the negative
log-likelihood of softmax(logits / T) on labelled images; it changes confidence, never the label.
The server reads T from the model folder's ttaserve.json and reports it in /v1/models.

    python -m benchmarks.calibrate --model demo --write                 # the demo's clean validation split
    python -m benchmarks.calibrate --model local-dir:/models/clip --data /data/val --class-names names.txt --write

Data: the synthetic validation split (seen compositions, never the test shifts), or an
ImageFolder-style directory. The fit uses the first half of the images and the ECE before and after
is reported on the second half, so the printed improvement is not measured on the fitted images.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from adapters import method_names
from benchmarks import synthetic
from benchmarks.accuracy import DirectRunner, Subset, folder_subset, tensors_to_pil
from benchmarks.scoring import ece_from

LOG_T_RANGE = (math.log(0.05), math.log(20.0))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [0.05, 20] minimising the NLL of softmax(logits / T): a grid, then golden-section refinement."""

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels))

    grid = torch.linspace(*LOG_T_RANGE, 121).tolist()
    best = min(range(len(grid)), key=lambda i: nll(grid[i]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def ece_at(logits: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    probs = (logits / temperature).softmax(-1)
    confidence = probs.gather(1, pred[:, None]).squeeze(1)
    return 100 * float(ece_from(confidence, (pred == labels).float()))


def model_folder(runner: DirectRunner) -> Path | None:
    name = runner.backbone.spec.name
    return Path(name[len("local-dir:"):]) if name.startswith("local-dir:") else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=None, help="ImageFolder directory (default: synthetic val split)")
    parser.add_argument("--class-names", type=Path, default=None)
    parser.add_argument("--templates", default=None, help="JSON list of templates for --data")
    parser.add_argument("--methods", default="all")
    parser.add_argument("--options", action="append", default=[], metavar="METHOD=JSON")
    parser.add_argument("--max-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="store the temperatures in the model's ttaserve.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    methods = method_names() if args.methods == "all" else args.methods.split(",")
    options = {m: json.loads(t) for m, _, t in (o.partition("=") for o in args.options)}
    if args.data is not None:
        templates = json.loads(args.templates) if args.templates else ["a photo of a {}."]
        subset = folder_subset(args.data, args.class_names, args.max_samples, args.seed, templates)
    else:
        batch = synthetic.make_split("val", args.max_samples, args.seed)
        subset = Subset("val", tensors_to_pil(batch.images), batch.labels, synthetic.CLASS_NAMES,
                        synthetic.TEMPLATES, corruption=False)
    runner = DirectRunner(args.model, args.pretrained, args.device, 64, args.seed)
    half = len(subset.images) // 2
    print(f"model: {runner.description}; {len(subset.images)} labelled images "
          f"(fit on {half}, ECE reported on the other {len(subset.images) - half})", flush=True)
    fitted: dict[str, dict[str, Any]] = {}
    for method in methods:
        started = time.perf_counter()
        out = runner.run(subset, method, options.get(method, {}))
        temperature = fit_temperature(out.logits[:half], subset.labels[:half])
        rest = (out.logits[half:], out.pred[half:], subset.labels[half:])
        before, after = ece_at(*rest, 1.0), ece_at(*rest, temperature)
        fitted[method] = {"temperature": round(temperature, 4), "ece_before": round(before, 2),
                          "ece_after": round(after, 2), "images": len(subset.images), "data": subset.name,
                          "options": options.get(method, {})}
        print(f"{method:10s} T = {temperature:6.3f}   ECE {before:5.1f}% -> {after:5.1f}% "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    if args.write:
        folder = model_folder(runner)
        if folder is None:
            raise SystemExit("--write stores temperatures in a local-dir model's ttaserve.json; package the model "
                             "as a folder (open_clip_config.json + weights) and pass --model local-dir:PATH")
        path = folder / "ttaserve.json"
        meta = json.loads(path.read_text()) if path.is_file() else {}
        meta.setdefault("calibration", {}).update(fitted)
        path.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"wrote {len(fitted)} temperature(s) to {path}")
    return fitted


if __name__ == "__main__":
    main()
