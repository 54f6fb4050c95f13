"""Zero-shot CLIP classification (Radford et al., 2021, https://arxiv.org/abs/2103.00020).

The reference every other method is measured and tested against: cosine similarity between the
image embedding and each class embedding (the renormalised mean over prompt templates), scaled by
the model's learned logit scale. Nothing is adapted. With a label set's descriptions, the
``descriptions.mix`` option mixes them into the class embeddings (adapters/descriptions.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.base import Method, MethodOptions, register


@dataclass(frozen=True)
class ZeroShotOptions(MethodOptions):
    """Zero-shot takes only the shared ``descriptions`` group (the description head)."""


@register
class ZeroShot(Method[ZeroShotOptions]):
    name = "zero_shot"
    summary = "Plain CLIP zero-shot with prompt ensembling; no adaptation, one forward pass per image."
    Options = ZeroShotOptions
