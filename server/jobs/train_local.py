"""``python -m server.jobs.train_local FOLDER --output adapter.safetensors``: train an adapter on this machine.

The same training as a job's worker (``server.service.training.train``: the images decoded and checked as
classify checks them, frozen class features from the templates, ``train_adapter``), from an ImageFolder:
each sub-folder of FOLDER is a label, named as the label, its image files the support images of it. The
model is the one the settings name (``TTA_MODEL``, ``TTA_PRETRAINED``, ``TTA_DEVICE``, ...: a server
with the same settings accepts the artifact; another model's refuses it with 409). Progress goes to
stderr; a JSON summary (the file, its labels, the model's fingerprint, the metrics) to stdout.
``tta train`` runs this, then uploads the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from server.clip.backbone import load_backbone
from server.clip.spec import resolve_model
from server.errors import ConfigError, TTAError
from server.service.jobs import train_config
from server.service.training import Pair, TrainInputs, TrainPlan, train
from server.service.validation import resolve_templates, validate_labels
from server.settings import Settings

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CONFIG_FLAGS: dict[str, type] = {
    "type": str,
    "steps": int,
    "lr": float,
    "batch_size": int,
    "seed": int,
    "lora_rank": int,
    "lora_alpha": float,
    "lora_blocks": int,
    "ctx_init": str,
    "label_smoothing": float,
}


def labelled(folder: Path) -> tuple[tuple[str, ...], TrainInputs]:
    """The labels (sub-folder names, sorted) and each image file under them (recursively) with its label."""
    labels, support = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            labels.append(sub.name)
            support += [Pair(p.read_bytes(), sub.name) for p in files]
    return tuple(labels), TrainInputs(tuple(support))


def say(line: str) -> None:
    """A line for the person watching (stderr: stdout carries the JSON summary only)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Progress:
    """One stderr line per second of training at most (and the last step)."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, step: int, steps: int, loss: float, elapsed_s: float) -> None:
        now = time.monotonic()
        if step != steps and now - self.last < 1.0:
            return
        self.last = now
        eta = elapsed_s / step * (steps - step)
        say(f"step {step}/{steps}  loss {loss:.4f}  {elapsed_s:.1f} s, about {eta:.0f} s left")


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(prog="python -m server.jobs.train_local", description=__doc__.split("\n")[0])
    out.add_argument("folder", type=Path, help="One sub-folder of images per label, named as the label.")
    out.add_argument("--output", "-o", type=Path, required=True, help="Where to write the artifact (.safetensors).")
    out.add_argument("--templates", help="A named template set (default TTA_DEFAULT_TEMPLATES).")
    for name, kind in CONFIG_FLAGS.items():
        out.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=f"TrainConfig.{name}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings()
        if not args.folder.is_dir():
            raise ConfigError(f"{args.folder} is not a folder")
        labels, inputs = labelled(args.folder)
        if not labels:
            raise ConfigError(f"no labelled images in {args.folder}: it needs one sub-folder of images per label")
        validate_labels(list(labels), settings)
        given: dict[str, Any] = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
        plan = TrainPlan(labels, resolve_templates(args.templates, settings), train_config(given, settings))
        say(f"training {plan.config.type} on {len(inputs.support)} images of {len(labels)} labels")
        backbone = load_backbone(settings, resolve_model(settings))
        fingerprint = backbone.measure_fingerprint()
        adapter = train(backbone, plan, inputs, settings, progress=Progress())
        args.output.write_bytes(adapter.to_bytes())
    except TTAError as exc:
        say(f"error: {exc.message}")
        return 2
    except (ConfigError, ValueError) as exc:
        say(f"error: {exc}")
        return 2
    summary = {"output": str(args.output), "labels": list(labels), "base_model": fingerprint}
    sys.stdout.write(json.dumps(summary | {"metrics": adapter.card.metrics}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
