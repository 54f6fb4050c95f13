"""Class text features: each label's prompts through the text tower, pooled into one classifier, cached.

A class is the renormalised mean of its unit-norm template features (CLIP's prompt ensembling). With
descriptions (one tuple per label, from its label set), a described label gets TPS's "micro" prototype
instead: the mean of its template mean and the mean of its description prompts
(``server.clip.templates.describe``), renormalised. Features are cached in an LRU bounded in bytes,
keyed by the labels, templates and descriptions; only the engine's lanes build them.
"""

from __future__ import annotations

import torch

from server.clip.backbone import Backbone
from server.clip.cache import ByteLRU, tensor_bytes
from server.clip.templates import describe, render

Descriptions = tuple[tuple[str, ...], ...]


class ClassFeatures:
    """[C, D] class embeddings of label sets, built with ``backbone`` and kept within ``max_bytes``."""

    def __init__(self, backbone: Backbone, max_bytes: int):
        self.backbone = backbone
        self.cache: ByteLRU[torch.Tensor] = ByteLRU(max_bytes, tensor_bytes)

    def get(
        self, labels: tuple[str, ...], templates: tuple[str, ...], descriptions: Descriptions | None = None
    ) -> torch.Tensor:
        """The unit-norm class features [C, D] (float32, on the device, an inference tensor)."""
        described = descriptions if descriptions and any(descriptions) else None
        key = (labels, templates, described)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        prompts = [render(t, label) for label in labels for t in templates]
        means = self.backbone.encode_prompts(prompts).view(len(labels), len(templates), -1).mean(dim=1)  # [C, D]
        if described is not None:
            sentences = [describe(label, d) for label, ds in zip(labels, described, strict=True) for d in ds]
            pooled = torch.split(self.backbone.encode_prompts(sentences), [len(ds) for ds in described])  # C x [n_c, D]
            means = torch.stack([(m + d.mean(0)) / 2 if len(d) else m for m, d in zip(means, pooled, strict=True)])
        classes = torch.nn.functional.normalize(means, dim=-1)  # [C, D]
        self.cache.put(key, classes)
        return classes

    @property
    def bytes(self) -> int:
        return self.cache.bytes
