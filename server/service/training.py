"""What a few-shot training job computes, in whichever process runs it: the job's worker or ``train_local``.

A job's inputs (its support images with their labels, and its anchor pairs) are kept in the store as one
JSON document (``TrainInputs``: images as base64 of the bytes the client sent, already decode-checked),
never as a pickle: the worker reads only data. ``TrainPlan`` is the rest of what it needs, kept in the
job's spec: the classes (the label set's labels, rendered with its templates) and the ``TrainConfig``.

``train`` decodes and preprocesses the images as classify does, builds the frozen class features the
way the server builds them for a label set (``server.engine.classes``: the mean of each label's template
prompts, renormalised; descriptions are not mixed in) and the frozen features of the anchor texts, and
calls ``adapters.fewshot.train.train_adapter``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from adapters.fewshot.artifact import Adapter
from adapters.fewshot.train import Anchors, Pairs, TrainConfig, train_adapter
from server.clip.backbone import Backbone
from server.engine.classes import ClassFeatures
from server.service.decoding import decode_image
from server.settings import Settings

INPUTS_FORMAT = "ttaserve-train-inputs/1"
Progress = Callable[[int, int, float, float], None]  # step, steps, loss, elapsed_s


@dataclass(frozen=True)
class Pair:
    """One image (its encoded bytes) and its text: a support image's label, or an anchor's caption."""

    image: bytes
    text: str


@dataclass(frozen=True)
class TrainInputs:
    """The images a job trains on: support images with their labels, caption anchors, and the retrieval pool."""

    support: tuple[Pair, ...]
    captions: tuple[Pair, ...] = ()
    pool: tuple[Pair, ...] = ()

    def to_bytes(self) -> bytes:
        def rows(pairs: Sequence[Pair]) -> list[dict[str, str]]:
            return [{"image": base64.b64encode(p.image).decode("ascii"), "text": p.text} for p in pairs]

        doc = {"format": INPUTS_FORMAT, "support": rows(self.support), "captions": rows(self.captions)}
        return json.dumps({**doc, "pool": rows(self.pool)}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainInputs:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != INPUTS_FORMAT:
            raise ValueError(f"the job's inputs are not {INPUTS_FORMAT}")

        def pairs(key: str) -> tuple[Pair, ...]:
            return tuple(Pair(base64.b64decode(r["image"], validate=True), str(r["text"])) for r in doc[key])

        return cls(pairs("support"), pairs("captions"), pairs("pool"))

    @property
    def images(self) -> int:
        return len(self.support) + len(self.captions) + len(self.pool)


@dataclass(frozen=True)
class TrainPlan:
    """The classes a job trains (labels and the templates their frozen features are built with) and how."""

    labels: tuple[str, ...]
    templates: tuple[str, ...]
    config: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "templates": list(self.templates), "config": asdict(self.config)}

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> TrainPlan:
        return cls(tuple(spec["labels"]), tuple(spec["templates"]), TrainConfig(**spec["config"]))


def preprocessed(backbone: Backbone, pairs: Sequence[Pair], settings: Settings, what: str) -> torch.Tensor:
    """[N, 3, H, W]: each image decoded (checked as classify checks it) and preprocessed for the model."""
    out = []
    for i, pair in enumerate(pairs):
        image = decode_image(pair.image, i, settings.max_image_pixels, settings.max_aspect_ratio)
        out.append(backbone.preprocess(image))
    if not out:
        raise ValueError(f"no {what} images")
    return torch.stack(out)


def frozen_text(backbone: Backbone, texts: Sequence[str]) -> torch.Tensor:
    """[M, D] unit-norm frozen features of ``texts`` as plain (not inference) tensors, fit to train against."""
    with torch.no_grad():
        return backbone.encode_prompts(list(texts)).clone()


def class_features(backbone: Backbone, plan: TrainPlan, settings: Settings) -> torch.Tensor:
    """[C, D] the frozen class features of the plan's labels, as the server builds them for classify."""
    with torch.no_grad():
        return ClassFeatures(backbone, settings.text_cache_bytes).get(plan.labels, plan.templates, None, 0.0).clone()


def _pairs(backbone: Backbone, pairs: Sequence[Pair], settings: Settings, what: str) -> Pairs | None:
    if not pairs:
        return None
    texts = tuple(p.text for p in pairs)
    return Pairs(preprocessed(backbone, pairs, settings, what), texts, frozen_text(backbone, texts))


def train(
    backbone: Backbone,
    plan: TrainPlan,
    inputs: TrainInputs,
    settings: Settings,
    *,
    progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
) -> Adapter:
    """Train the plan's adapter on ``inputs`` with the loaded, fingerprinted ``backbone``."""
    images = preprocessed(backbone, inputs.support, settings, "support")
    index = {label: i for i, label in enumerate(plan.labels)}
    targets = torch.tensor([index[p.text] for p in inputs.support], dtype=torch.long)
    anchors = Anchors(
        captions=_pairs(backbone, inputs.captions, settings, "caption anchor"),
        pool=_pairs(backbone, inputs.pool, settings, "pool anchor"),
    )
    return train_adapter(
        backbone,
        images,
        targets,
        plan.labels,
        class_features(backbone, plan, settings),
        plan.config,
        base_model=backbone.fingerprint,
        anchors=anchors,
        progress=progress,
        stop=stop,
    )
