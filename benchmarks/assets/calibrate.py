"""Fit the calibration temperature of each method on labelled data, and store it with the model.

Temperature scaling (Guo et al., 2017): one scalar T per (model, method) that minimises the negative
log-likelihood of softmax(logits / T) on labelled images; it changes confidence, never the label.
The server reads T from the model folder's ttaserve.json (its model card) and reports it in /v1/models.
Each method runs through the server's own classify pipeline, in this process, and T is fitted by
``server.service.calibration.fit_temperature``. It prints, per method, T and the ECE before and after.

    python -m benchmarks.assets.calibrate --model demo --write      # the demo's clean validation split
    python -m benchmarks.assets.calibrate --model local-dir:/models/clip --data /data/val \
        --class-names names.txt --write

Data: the synthetic validation split (seen compositions, never the test shifts), or an
ImageFolder-style directory. The fit uses the first half of the images and the ECE before and after
is reported on the second half, so the printed improvement is not measured on the fitted images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from adapters import method_names
from benchmarks._lib import synthetic
from benchmarks._lib.data import Subset, folder_subset, tensors_to_pil
from benchmarks._lib.runners import DirectRunner
from benchmarks._lib.scoring import ece_from
from server.clip.card import CardCalibration, read_card, write_card
from server.service.calibration import fit_temperature


def ece_at(logits: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    probs = (logits / temperature).softmax(-1)
    confidence = probs.gather(1, pred[:, None]).squeeze(1)
    return 100 * float(ece_from(confidence, (pred == labels).float()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
        subset = Subset(
            "val",
            tensors_to_pil(batch.images),
            batch.labels,
            synthetic.CLASS_NAMES,
            synthetic.TEMPLATES,
            corruption=False,
        )
    runner = DirectRunner(args.model, args.pretrained, args.device, 64, args.seed)
    half = len(subset.images) // 2
    print(
        f"model: {runner.description}; {len(subset.images)} labelled images "
        f"(fit on {half}, ECE reported on the other {len(subset.images) - half})",
        flush=True,
    )
    fitted: dict[str, CardCalibration] = {}
    try:
        for method in methods:
            started = time.perf_counter()
            out = runner.run(subset, method, options.get(method, {}))
            temperature = fit_temperature(out.logits[:half], subset.labels[:half])
            rest = (out.logits[half:], out.pred[half:], subset.labels[half:])
            before, after = ece_at(*rest, 1.0), ece_at(*rest, temperature)
            fitted[method] = CardCalibration(
                temperature=round(temperature, 4),
                ece_before=round(before, 2),
                ece_after=round(after, 2),
                images=len(subset.images),
                data=subset.name,
                options=options.get(method, {}),
            )
            print(
                f"{method:10s} T = {temperature:6.3f}   ECE {before:5.1f}% -> {after:5.1f}% "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        folder = runner.runtime.spec.folder
    finally:
        runner.close()
    if args.write:
        if folder is None:
            raise SystemExit(
                "--write stores temperatures in a local-dir model's ttaserve.json; package the model "
                "as a folder (open_clip_config.json + weights) and pass --model local-dir:PATH"
            )
        card = read_card(folder)
        card.calibration.update(fitted)
        print(f"wrote {len(fitted)} temperature(s) to {write_card(folder, card)}")
    return {method: entry.model_dump(exclude_none=True) for method, entry in fitted.items()}


if __name__ == "__main__":
    main()
