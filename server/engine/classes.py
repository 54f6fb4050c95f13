"""Class text features: each label's prompts through the text tower, pooled into one classifier, cached.

A class is the renormalised mean of its unit-norm template features (CLIP's prompt ensembling). With
descriptions (one tuple per label, from its label set) and a description mix above 0, a described
label goes through the description head every method shares (``adapters.descriptions.head``): the
mix of its template mean and the mean of its description prompts (``server.clip.templates.describe``),
renormalised; TPS's "micro" prototype is the mix 0.5. The anchor texts of the ``anchor_kl``
regularizer are encoded here too. Features are cached in an LRU bounded in bytes, keyed by what
they are built from; only the engine's lanes build them.

A large label set is built a chunk at a time (``TextBuild``): the service tokenizes its prompts off the
lanes, and the zero-shot lane encodes one chunk of ``TEXT_CHUNK`` prompts between its image batches, so one request's
1,000 labels x 80 templates never hold everyone else's answers (``server.engine.engine``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapters import Stopped
from adapters.descriptions import DescriptionFeatures, head
from adapters.regularizers import anchor_texts
from server.clip.backbone import TEXT_CHUNK, Backbone
from server.clip.cache import ByteLRU, tensor_bytes
from server.clip.templates import describe

Descriptions = tuple[tuple[str, ...], ...]


def described(descriptions: Descriptions | None) -> Descriptions | None:
    """The descriptions if any label has one, else None."""
    return descriptions if descriptions and any(descriptions) else None


def _sentences(labels: tuple[str, ...], descriptions: Descriptions) -> list[str]:
    """Every description sentence, label-major."""
    return [describe(label, d) for label, ds in zip(labels, descriptions, strict=True) for d in ds]


def _description_means(encoded: torch.Tensor, descriptions: Descriptions) -> DescriptionFeatures:
    """[sum n_c, D] description features (label-major) -> each label's mean (zero where it has none)."""
    pooled = torch.split(encoded, [len(ds) for ds in descriptions])  # C x [n_c, D]
    means = torch.stack([p.mean(0) if len(p) else torch.zeros_like(encoded[0]) for p in pooled])  # [C, D]
    present = torch.tensor([len(ds) > 0 for ds in descriptions], device=means.device)
    return DescriptionFeatures(means, present)


@dataclass(frozen=True)
class ClassText:
    """What a set of class features is built from: labels, templates and, when the description head mixes them
    in, each label's descriptions and the mix."""

    labels: tuple[str, ...]
    templates: tuple[str, ...]
    descriptions: Descriptions | None = None  # None: no label is described, or the mix is 0
    mix: float = 0.0  # the descriptions' weight in the head (0 without descriptions)

    @classmethod
    def of(
        cls, labels: tuple[str, ...], templates: tuple[str, ...], descriptions: Descriptions | None, mix: float
    ) -> ClassText:
        given = described(descriptions) if mix > 0 else None
        return cls(labels, templates, given, mix if given else 0.0)

    @property
    def key(self) -> tuple[object, ...]:
        """The cache key: plain tuples, so the cache counts the bytes of every label and template it keeps."""
        return ("classes", self.labels, self.templates, self.descriptions, self.mix)

    def sentences(self) -> list[str]:
        """Every description sentence, label-major (none without descriptions)."""
        return _sentences(self.labels, self.descriptions) if self.descriptions is not None else []

    @property
    def n_prompts(self) -> int:
        described = sum(len(ds) for ds in self.descriptions) if self.descriptions is not None else 0
        return len(self.labels) * len(self.templates) + described

    def pool(self, encoded: torch.Tensor) -> torch.Tensor:
        """[n_prompts, D] prompt features (every template prompt, label-major, then every description sentence)
        -> [C, D] unit-norm class features, through the description head."""
        n_templates = len(self.labels) * len(self.templates)
        means = encoded[:n_templates].view(len(self.labels), len(self.templates), -1).mean(dim=1)  # [C, D]
        if self.descriptions is None:
            return head(means, None, 0.0)
        return head(means, _description_means(encoded[n_templates:], self.descriptions), self.mix)


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
        self,
        labels: tuple[str, ...],
        templates: tuple[str, ...],
        descriptions: Descriptions | None = None,
        mix: float = 0.5,
    ) -> torch.Tensor:
        """The unit-norm class features [C, D] (float32, on the device, an inference tensor), built whole if
        they are not cached."""
        return self.features(ClassText.of(labels, templates, descriptions, mix))

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

    def step(self, build: TextBuild) -> None:
        """Encode the next ``TEXT_CHUNK`` prompts of ``build``: what one lane turn runs. Every build takes the
        same chunks, so the features are the same to the bit whichever lane built them."""
        chunk = build.tokens[build.done_prompts : build.done_prompts + TEXT_CHUNK]
        build.encoded.append(self.backbone.encode_tokens(chunk))
        build.done_prompts += int(chunk.shape[0])

    def descriptions(self, labels: tuple[str, ...], descriptions: Descriptions) -> DescriptionFeatures:
        """Each label's description prompts through the text tower: their mean [C, D] and which labels have any."""
        key = ("descriptions", labels, descriptions)
        means = self.cache.get(key)
        if means is None:
            means = _description_means(
                self.backbone.encode_prompts(_sentences(labels, descriptions)), descriptions
            ).means
            self.cache.put(key, means)
        present = torch.tensor([len(ds) > 0 for ds in descriptions], device=means.device)
        return DescriptionFeatures(means, present)

    def anchors(self, extra: tuple[str, ...] = ()) -> torch.Tensor:
        """[M, D] unit-norm features of the anchor texts: the shipped bank and ``extra``."""
        texts = anchor_texts(extra)
        key = ("anchors", texts)
        cached = self.cache.get(key)
        if cached is None:
            cached = self.backbone.encode_prompts(list(texts))
            self.cache.put(key, cached)
        return cached

    @property
    def bytes(self) -> int:
        return self.cache.bytes
