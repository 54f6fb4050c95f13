"""An adapter acting on the frozen model: the image and class features it gives, for evaluation and serving.

Pure functions over ``adapters.Backbone``; training (``adapters.fewshot.train``) measures its "after"
figures with them, so what is served is what was measured. The model's weights are never modified:

- images: with a lora part, the vision tower up to the first adapted block runs frozen
  (``Backbone.vision_prefix``) and the adapted blocks run with the adapter's factors
  (``Backbone.vision_suffix``); without one, ``Backbone.encode_images``.
- classes: with a prompt part, each label is encoded as ``"{ctx} {label}."`` with the learned context
  (``Backbone.prompt_inputs`` + ``encode_text_with_contexts``); without one, the frozen class features
  the caller holds (its template ensemble). Then the text adapter, when there is one.

An adapter at its starting point (ctx = ctx_init, W = I, b = 0, B = 0) gives the frozen model's
features: the frozen template features for the classes (``"{ctx_init} {label}."`` with a prompt
part), ``encode_images`` for the images (to float32 rounding, ``tests/unit/test_lowrank.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapters.backbone import Backbone
from adapters.fewshot.artifact import Adapter
from adapters.lowrank import LoraFactors, LoraTargets

IMAGE_CHUNK = 256  # images per pass of the vision tower: bounds activation memory


def lora_targets_of(backbone: Backbone, adapter: Adapter) -> LoraTargets:
    """The backbone's LoRA targets for the adapter's lora part: q and v of as many blocks as it adapts."""
    return backbone.lora_targets(max(1, len(adapter.lora_indices()) // 2))


def lora_factors_of(backbone: Backbone, adapter: Adapter) -> LoraFactors:
    """The adapter's lora part as factors on the backbone's device (ArtifactError if the targets differ)."""
    factors = adapter.lora_factors(lora_targets_of(backbone, adapter))
    device = backbone.device
    return LoraFactors(
        factors.targets, tuple(a.to(device) for a in factors.a), tuple(b.to(device) for b in factors.b), factors.alpha
    )


def adapter_image_features(backbone: Backbone, adapter: Adapter, images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] preprocessed images -> [N, D] unit-norm float32 features with the adapter's lora part
    (the frozen features without one), ``IMAGE_CHUNK`` images at a time."""
    if "lora" not in adapter.card.parts:
        return torch.cat([backbone.encode_images(chunk) for chunk in torch.split(images, IMAGE_CHUNK)])
    lora = lora_factors_of(backbone, adapter)
    with torch.no_grad():
        chunks = torch.split(images, IMAGE_CHUNK)
        return torch.cat([backbone.vision_suffix(backbone.vision_prefix(c, lora.targets), lora) for c in chunks])


def adapter_class_features(
    backbone: Backbone, adapter: Adapter, labels: Sequence[str], frozen_class_features: torch.Tensor
) -> torch.Tensor:
    """Class features [C, D] (unit-norm float32, on the device) of ``labels`` under the adapter.

    ``frozen_class_features`` [C, D] are the frozen model's features of ``labels`` (the served template
    ensemble); a prompt part replaces them by ``"{ctx} {label}."`` with its learned context, then a text
    adapter maps them. Any label set works, not only the adapter's training labels."""
    if frozen_class_features.dim() != 2 or frozen_class_features.shape[0] != len(labels):
        raise ValueError(
            f"frozen_class_features has shape {tuple(frozen_class_features.shape)}; expected [{len(labels)}, D]"
        )
    feats = frozen_class_features.to(backbone.device, torch.float32)
    with torch.no_grad():
        if "prompt" in adapter.card.parts:
            ctx_init = adapter.card.ctx_init
            if ctx_init is None:
                raise ValueError("the adapter has a prompt part but its card names no ctx_init")
            inputs = backbone.prompt_inputs(tuple(labels), ctx_init)
            ctx = adapter.tensors["prompt.ctx"].to(backbone.device)
            feats = backbone.encode_text_with_contexts(ctx[None], [inputs])[0]
        return adapter.adapt_text(feats)
