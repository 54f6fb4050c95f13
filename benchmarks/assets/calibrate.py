"""Fit the label-free confidence model on labelled images: the server's shipped default, or a model's own.

Confidence is read off each image's zero-shot prediction (``server.service.confidence``); this tool
fits that reading to labelled images. It runs zero-shot through the server's classify pipeline, in
this process, fits on the first half of the images and prints, on the other half, accuracy, mean
confidence and ECE (15 bins) raw, with the current model, and with the fitted one.

- The shipped default (``--default``): the synthetic validation split, clean and the shift families
  of ``--families`` at ``--severities`` (never the test split, never the families the benchmark
  reports on), all images fitted. Writes server/service/label_free_confidence.json.
- A model's own (``--write``): an ImageFolder directory (``--data``, one sub-folder per class) of the
  images it will serve, shifted ones included if it will see them. Writes the ``confidence`` entry of
  the model's card (ttaserve.json), which the server then uses instead of the default.

    python -m benchmarks.assets.calibrate --model demo --default
    python -m benchmarks.assets.calibrate --model local-dir:/models/clip --data /data/val \\
        --class-names names.txt --write
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks._lib import shifts
from benchmarks._lib.data import Subset, folder_subset, synthetic_subsets
from benchmarks._lib.runners import DirectRunner
from benchmarks._lib.scoring import ece_from
from server.clip.card import read_card, write_card
from server.service.confidence import DEFAULT_FILE, ConfidenceModel


def report(title: str, logits: torch.Tensor, labels: torch.Tensor, models: dict[str, ConfidenceModel]) -> None:
    """Accuracy, and mean confidence and ECE raw and under each model, on labelled images."""
    right = (logits.argmax(-1) == labels).float()
    columns = {"raw": logits.softmax(-1).max(-1).values} | {name: m.predict(logits) for name, m in models.items()}
    cells = "  ".join(
        f"{name} {100 * c.mean():5.1f}% (ECE {100 * float(ece_from(c, right)):4.1f})" for name, c in columns.items()
    )
    print(f"{title:22s} accuracy {100 * right.mean():5.1f}%  mean confidence: {cells}")


def main(argv: list[str] | None = None) -> ConfidenceModel:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=None, help="ImageFolder directory (default: synthetic val)")
    parser.add_argument("--class-names", type=Path, default=None)
    parser.add_argument("--templates", default=None, help="JSON list of templates for --data")
    parser.add_argument("--families", default="noise,weather,style", help=f"of {', '.join(shifts.FAMILIES)}")
    parser.add_argument("--severities", default="2,3")
    parser.add_argument("--max-samples", type=int, default=500, help="images per set (per shift and severity)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--default", action="store_true", help=f"write the shipped default ({DEFAULT_FILE.name})")
    target.add_argument("--write", action="store_true", help="write it into the model's card (ttaserve.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.data is not None:
        templates = json.loads(args.templates) if args.templates else ["a photo of a {}."]
        subsets: list[Subset] = [folder_subset(args.data, args.class_names, args.max_samples, args.seed, templates)]
        data = f"{args.data} ({len(subsets[0].images)} labelled images)"
    else:
        names = [name for family in args.families.split(",") for name in shifts.FAMILIES[family]]
        severities = [int(s) for s in args.severities.split(",")]
        subsets = synthetic_subsets(["clean"], [], args.max_samples, args.seed, split="val")
        subsets += synthetic_subsets(names, severities, args.max_samples, args.seed, split="val")
        data = f"{args.model} validation split: clean and {args.families} at severities {args.severities}"
    runner = DirectRunner(args.model, args.pretrained, args.device, 64, args.seed)
    try:
        outs = [runner.run(subset, "zero_shot", {}) for subset in subsets]
        current = runner.runtime.calibration.label_free
        folder = runner.runtime.spec.folder
    finally:
        runner.close()
    logits = torch.cat([out.logits for out in outs])
    labels = torch.cat([subset.labels for subset in subsets])
    # The shipped default fits every image (it is reported on other families and other models); a model's
    # own fits half of its images and is reported on the other half.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    fit = order if args.default else order[: len(order) // 2]
    held = order if args.default else order[len(order) // 2 :]
    fitted = ConfidenceModel.fit(logits[fit], labels[fit], data)
    print(f"fitted on {len(fit)} images: {data}")
    report(
        "all" if args.default else "held-out half", logits[held], labels[held], {"current": current, "fitted": fitted}
    )
    if args.default:
        start = 0
        for subset in subsets:
            n = len(subset.labels)
            report(subset.title, logits[start : start + n], labels[start : start + n], {"fitted": fitted})
            start += n
        DEFAULT_FILE.write_text(json.dumps(fitted.to_dict(), indent=2) + "\n")
        print(f"wrote {DEFAULT_FILE}")
    elif args.write:
        if folder is None:
            raise SystemExit(
                "--write stores the confidence model in a local-dir model's ttaserve.json; package the "
                "model as a folder (open_clip_config.json + weights) and pass --model local-dir:PATH"
            )
        card = read_card(folder)
        card.confidence = fitted.to_dict()
        print(f"wrote the confidence model to {write_card(folder, card)}")
    return fitted


if __name__ == "__main__":
    main()
