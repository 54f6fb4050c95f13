"""The images a benchmark measures on: the synthetic shift suite, or ImageFolder-style directories."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks._lib import shifts as shift_suite
from benchmarks._lib import synthetic

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class Subset:
    """One row group of the table: images of one shift at one severity, with their labels."""

    name: str
    images: list[Image.Image]
    labels: torch.Tensor  # [N]
    class_names: list[str]
    templates: list[str]
    corruption: bool  # pooled into the corruption average
    label_set: str | None = None  # send this stored label set (its labels are class_names) instead of the labels

    @property
    def title(self) -> str:
        return self.name


def tensors_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [0, 1] (already on the 8-bit grid) -> RGB PIL images, exactly."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


BLURRED = "+blur"  # suffix: the shift, then the control's slight blur (e.g. gaussian_noise+blur)


def synthetic_subsets(names: list[str], severities: list[int], n: int, seed: int, split: str = "test") -> list[Subset]:
    """Subsets of the shift suite, from the test split or (``split="val"``) the validation split.
    ``NAME+blur`` rows blur the shifted images as the control does: on noise, zero-shot on them shows
    how much of a view-based method's gain plain low-pass filtering gets."""
    out = []
    for entry in names:
        name, blurred = entry.removesuffix(BLURRED), entry.endswith(BLURRED)
        if name not in shift_suite.SHIFTS and name not in ("clean", "control", "heldout"):
            raise SystemExit(
                f"unknown shift {entry!r}; known: clean, control, heldout, "
                f"{', '.join(shift_suite.SHIFTS)} (each may end in {BLURRED})"
            )
        levels = severities if name in shift_suite.SHIFTS else [0]
        for severity in levels:
            images, labels = shift_suite.make_shifted(name, severity, n, seed, split)
            if blurred:
                images = shift_suite.control(images)
            title = (f"{name}-{severity}" if severity else name) + (BLURRED if blurred else "")
            out.append(
                Subset(
                    title,
                    tensors_to_pil(images),
                    labels,
                    synthetic.CLASS_NAMES,
                    synthetic.TEMPLATES,
                    corruption=name in shift_suite.CORRUPTIONS and not blurred,
                )
            )
    return out


def folder_subset(root: Path, class_names_file: Path | None, n: int, seed: int, templates: list[str]) -> Subset:
    """An ImageFolder-style directory: one sub-folder per class, sorted; names from the file if given."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if class_names_file is not None:
        names = [line.strip() for line in class_names_file.read_text().splitlines() if line.strip()]
        if len(names) != len(folders):
            raise SystemExit(f"{class_names_file} has {len(names)} names for {len(folders)} class folders in {root}")
    else:
        names = [f.name.replace("_", " ") for f in folders]
    files = [
        (p, i) for i, f in enumerate(folders) for p in sorted(f.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    rng = np.random.default_rng(seed)
    if n and len(files) > n:
        files = [files[i] for i in sorted(rng.choice(len(files), n, replace=False))]
    images = [Image.open(p).convert("RGB") for p, _ in files]
    return Subset(root.name, images, torch.tensor([i for _, i in files]), names, templates, corruption=False)
