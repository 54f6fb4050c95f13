"""Class text features: each label's prompts through the text tower, pooled into one classifier, cached.

A class is the renormalised mean of its unit-norm template features (CLIP's prompt ensembling). With
descriptions (one tuple per label, from its label set) and a description mix above 0, a described
label goes through the description head every method shares (``adapters.descriptions.head``): the
mix of its template mean and the mean of its description prompts (``server.clip.templates.describe``),
renormalised; TPS's "micro" prototype is the mix 0.5. The anchor texts of the ``anchor_kl``
regularizer are encoded here too. Features are cached in an LRU bounded in bytes, keyed by what
they are built from; only the engine's lanes build them.
"""

from __future__ import annotations

import torch

from adapters.descriptions import DescriptionFeatures, head
from adapters.regularizers import anchor_texts
from server.clip.backbone import Backbone
from server.clip.cache import ByteLRU, tensor_bytes
from server.clip.templates import describe, render

Descriptions = tuple[tuple[str, ...], ...]


def described(descriptions: Descriptions | None) -> Descriptions | None:
    """The descriptions if any label has one, else None."""
    return descriptions if descriptions and any(descriptions) else None


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
        """The unit-norm class features [C, D] (float32, on the device, an inference tensor)."""
        given = described(descriptions) if mix > 0 else None
        key = ("classes", labels, templates, given, mix if given else None)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        prompts = [render(t, label) for label in labels for t in templates]
        means = self.backbone.encode_prompts(prompts).view(len(labels), len(templates), -1).mean(dim=1)  # [C, D]
        classes = head(means, self.descriptions(labels, given) if given else None, mix)  # [C, D]
        self.cache.put(key, classes)
        return classes

    def descriptions(self, labels: tuple[str, ...], descriptions: Descriptions) -> DescriptionFeatures:
        """Each label's description prompts through the text tower: their mean [C, D] and which labels have any."""
        key = ("descriptions", labels, descriptions)
        means = self.cache.get(key)
        if means is None:
            sentences = [describe(label, d) for label, ds in zip(labels, descriptions, strict=True) for d in ds]
            encoded = self.backbone.encode_prompts(sentences)  # [sum n_c, D]; some label has a description
            pooled = torch.split(encoded, [len(ds) for ds in descriptions])  # C x [n_c, D]
            means = torch.stack([p.mean(0) if len(p) else torch.zeros_like(encoded[0]) for p in pooled])  # [C, D]
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
