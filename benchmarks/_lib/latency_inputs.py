"""What the adaptation benchmarks share: their inputs (label names, test images as the server decodes them,
a label set's text built once) and our methods run as the engine runs them, one image at a time.

``benchmarks/adaptation_latency.py`` times these beside the published loops and the server;
``benchmarks/memory_estimate.py`` measures their memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from adapters import get_method
from benchmarks._lib import reference, synthetic
from benchmarks._lib.data import tensors_to_pil
from server.clip import Backbone
from server.engine.adaptation import adapt_image, image_seed
from server.engine.classes import ClassFeatures
from server.service.decoding import ORIGINAL_SIDE_FACTOR, decode_image, to_uint8_tensor

TEMPLATES = (reference.PROMPT,)  # one template: the references' prompt, so (a) and (b) share class features
MODIFIERS = (
    "",
    "small",
    "large",
    "striped",
    "dotted",
    "checkered",
    "pale",
    "dark",
    "glossy",
    "faded",
    "tiny",
    "giant",
    "hollow",
    "plain",
    "bright",
    "dull",
)


# -- inputs ---------------------------------------------------------------------------------------
def class_names(n: int) -> list[str]:
    """``n`` distinct labels of 2 to 3 words from the synthetic shapes' vocabulary ("small red circle")."""
    names = []
    for i in range(n):
        shape = synthetic.SHAPES[i % len(synthetic.SHAPES)]
        colour = synthetic.COLOUR_NAMES[(i // len(synthetic.SHAPES)) % len(synthetic.COLOUR_NAMES)]
        rest = i // (len(synthetic.SHAPES) * len(synthetic.COLOUR_NAMES))
        words = [MODIFIERS[rest % len(MODIFIERS)], colour, shape]
        if rest >= len(MODIFIERS):
            words.append(f"number {rest // len(MODIFIERS)}")
        names.append(" ".join(w for w in words if w))
    return names


@dataclass
class Sample:
    """One test image, as the server sees it."""

    png: bytes
    original: torch.Tensor  # [3, H0, W0] uint8, the decoded image
    base: torch.Tensor  # [3, h, w] its normal preprocessing


def make_samples(backbone: Backbone, n: int, side: int) -> list[Sample]:
    """Synthetic shapes upscaled to ``side`` px, PNG-encoded, then decoded as the server decodes them."""
    # The server caps the short side of the image views are cropped from; stay under the cap so both agree.
    side = min(side, ORIGINAL_SIDE_FACTOR * max(backbone.image_size))
    out = []
    for image in tensors_to_pil(synthetic.make_split("test_seen", n, seed=1).images):
        buf = io.BytesIO()
        image.resize((side, side), Image.BICUBIC).save(buf, format="PNG")
        decoded = decode_image(buf.getvalue(), 0, 10**9)
        out.append(Sample(buf.getvalue(), to_uint8_tensor(decoded), backbone.preprocess(decoded)))
    return out


class LabelSet:
    """One label set's text, built once as each official code builds it once per data set."""

    def __init__(self, backbone: Backbone, labels: list[str]):
        self.backbone = backbone
        self.labels = tuple(labels)
        self._learners: dict[str, reference.PromptLearner] = {}
        self._text: torch.Tensor | None = None

    def learner(self, ctx_init: str) -> reference.PromptLearner:
        if ctx_init not in self._learners:
            self._learners[ctx_init] = reference.PromptLearner(
                self.backbone.model, self.backbone.tokenizer, self.labels, ctx_init
            )
        return self._learners[ctx_init]

    @property
    def text(self) -> torch.Tensor:
        """[C, D] "a photo of a {label}." features: TPS's prototypes and ZERO's cached text."""
        if self._text is None:
            self._text = reference.encode_labels(self.backbone.model, self.backbone.tokenizer, self.labels)
        return self._text


_CLASS_FEATURES: dict[int, ClassFeatures] = {}


def class_features(backbone: Backbone, labels: tuple[str, ...]) -> torch.Tensor:
    """[C, D] the engine's class features of ``labels`` (one template), cached as the engine caches them."""
    features = _CLASS_FEATURES.setdefault(id(backbone), ClassFeatures(backbone, 2**30))
    return features.get(labels, TEMPLATES)


def run_ours(method: str, options: Any, label_set: LabelSet, sample: Sample, seed: int) -> tuple[torch.Tensor, int]:
    """One image through our method as the engine runs it: the final logits [C] and the predicted class."""
    backbone = label_set.backbone
    classes = class_features(backbone, label_set.labels).clone()  # [C, D], cached after the first
    generator = torch.Generator().manual_seed(image_seed(seed, 0))
    logits, report = adapt_image(
        backbone, get_method(method), options, sample.original, sample.base, classes, label_set.labels, generator
    )
    top = int(report.order[0]) if report.order is not None else int(logits.argmax())
    return logits, top


def forward(backbone: Backbone, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The forward pass alone: [N, 3, h, w] images -> [N, C] logits against cached class features."""
    return backbone.logit_scale * backbone.encode_images(images) @ classes.T


def method_options(method: str, views: int, steps: int) -> dict[str, int]:
    """The request's options: the views, and the steps where the method takes them (ZERO does not)."""
    fields = {f.name for f in dataclasses.fields(get_method(method).Options)}
    return {"views": views} | ({"steps": steps} if "steps" in fields else {})


def csv_ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def add_model_arguments(parser: argparse.ArgumentParser, methods: tuple[str, ...]) -> None:
    """The model, device, threads, label-set sizes and methods a benchmark runs on."""
    parser.add_argument("--model", default="ViT-B-32", help="any TTA_MODEL form")
    parser.add_argument("--pretrained", default="none", help="a pretrained tag or checkpoint; none: random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (and the server's)")
    parser.add_argument("--classes", type=csv_ints, default=[10, 100, 1000], help="label-set sizes C")
    parser.add_argument("--methods", default=",".join(methods))
