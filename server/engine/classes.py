"""Class text features: each label's prompts through the text tower, pooled into one classifier, cached.

A class is the renormalised mean of its unit-norm template features (CLIP's prompt ensembling). With
descriptions (one tuple per label, from its label set), a described label gets TPS's "micro" prototype
instead: the mean of its template mean and the mean of its description prompts
(``server.clip.templates.describe``), renormalised. Features are cached in an LRU bounded in bytes,
keyed by the labels, templates and descriptions; only the engine's lanes build them.

A large label set is built a chunk at a time (``TextBuild``): the service tokenizes its prompts off the
lanes, and the zero-shot lane encodes a chunk of about 50 ms between its image batches, so one request's
1,000 labels x 80 templates never hold everyone else's answers (``server.engine.engine``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters import Method, Stopped
from server.clip.backbone import TEXT_CHUNK, Backbone
from server.clip.cache import ByteLRU, tensor_bytes
from server.clip.templates import describe

Descriptions = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class ClassText:
    """What a set of class features is built from: labels, templates and, when used, each label's descriptions."""

    labels: tuple[str, ...]
    templates: tuple[str, ...]
    descriptions: Descriptions | None = None  # None: no label is described (or the method does not use them)

    @classmethod
    def of(cls, labels: tuple[str, ...], templates: tuple[str, ...], descriptions: Descriptions | None) -> ClassText:
        return cls(labels, templates, descriptions if descriptions and any(descriptions) else None)

    @classmethod
    def for_method(
        cls, method: Method[Any], labels: tuple[str, ...], templates: tuple[str, ...], descriptions: Descriptions | None
    ) -> ClassText:
        """A request's class text: its label set's descriptions count when the method uses them (TPS)."""
        return cls.of(labels, templates, descriptions if method.uses_descriptions else None)

    def sentences(self) -> list[str]:
        """Every description sentence, label-major (none without descriptions)."""
        if self.descriptions is None:
            return []
        described = zip(self.labels, self.descriptions, strict=True)
        return [describe(label, d) for label, ds in described for d in ds]

    @property
    def key(self) -> tuple[object, ...]:
        """The cache key: plain tuples, so the cache counts the bytes of every label and template it keeps."""
        return (self.labels, self.templates, self.descriptions)

    @property
    def n_prompts(self) -> int:
        described = sum(len(ds) for ds in self.descriptions) if self.descriptions is not None else 0
        return len(self.labels) * len(self.templates) + described

    def pool(self, encoded: torch.Tensor) -> torch.Tensor:
        """[n_prompts, D] prompt features (every template prompt, label-major, then every description sentence)
        -> [C, D] unit-norm class features."""
        n_templates = len(self.labels) * len(self.templates)
        means = encoded[:n_templates].view(len(self.labels), len(self.templates), -1).mean(dim=1)  # [C, D]
        if self.descriptions is not None:
            pooled = torch.split(encoded[n_templates:], [len(ds) for ds in self.descriptions])  # C x [n_c, D]
            means = torch.stack([(m + d.mean(0)) / 2 if len(d) else m for m, d in zip(means, pooled, strict=True)])
        return torch.nn.functional.normalize(means, dim=-1)


@dataclass(eq=False)
class TextBuild:
    """Class features being built: their prompts' tokens (made off the lanes) and the chunks encoded so far."""

    text: ClassText
    tokens: torch.Tensor  # [n_prompts, context] token ids, CPU
    encoded: list[torch.Tensor] = field(default_factory=list)  # each [<= TEXT_CHUNK, D]
    done_prompts: int = 0

    @property
    def remaining(self) -> int:
        return int(self.tokens.shape[0]) - self.done_prompts


class ClassFeatures:
    """[C, D] class embeddings of label sets, built with ``backbone`` and kept within ``max_bytes``."""

    def __init__(self, backbone: Backbone, max_bytes: int):
        self.backbone = backbone
        self.cache: ByteLRU[torch.Tensor] = ByteLRU(max_bytes, tensor_bytes)

    def get(
        self, labels: tuple[str, ...], templates: tuple[str, ...], descriptions: Descriptions | None = None
    ) -> torch.Tensor:
        """The unit-norm class features [C, D] (float32, on the device, an inference tensor), built whole if
        they are not cached."""
        return self.features(ClassText.of(labels, templates, descriptions))

    def features(
        self, text: ClassText, build: TextBuild | None = None, stop: Callable[[], bool] = lambda: False
    ) -> torch.Tensor:
        """The features of ``text``: cached, else finished from ``build`` (or built whole) and cached. ``stop`` is
        asked between chunks; when it says so, ``adapters.Stopped`` is raised."""
        cached = self.cache.get(text.key)
        if cached is not None:
            return cached
        if build is None:
            build = self.start(text)
        while build.remaining:
            if stop():
                raise Stopped(f"stopped with {build.remaining} of {text.n_prompts} prompts to encode")
            self.step(build)
        classes = text.pool(torch.cat(build.encoded))
        self.cache.put(text.key, classes)
        return classes

    def cached(self, text: ClassText) -> bool:
        return self.cache.get(text.key) is not None

    def start(self, text: ClassText) -> TextBuild:
        """A build of ``text``'s features, its prompts tokenized (safe from any thread)."""
        tokens = self.backbone.tokenize_rendered(text.labels, text.templates)
        sentences = text.sentences()
        if sentences:
            tokens = torch.cat([tokens, self.backbone.tokenize(sentences)])
        return TextBuild(text, tokens)

    def step(self, build: TextBuild, prompts: int = TEXT_CHUNK) -> None:
        """Encode the next ``prompts`` prompts of ``build`` (at most ``TEXT_CHUNK``): what one lane turn runs."""
        chunk = build.tokens[build.done_prompts : build.done_prompts + min(prompts, TEXT_CHUNK)]
        build.encoded.append(self.backbone.encode_tokens(chunk))
        build.done_prompts += int(chunk.shape[0])

    @property
    def bytes(self) -> int:
        return self.cache.bytes
