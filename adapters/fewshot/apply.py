"""An adapter acting on the frozen model: the image and class features it gives, for evaluation and serving,
and the blends toward the frozen model's features that ``adapter_alpha`` asks for.

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
import torch.nn.functional as F

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


APEX_BETA = 4.0  # APEX's code: alpha_c = exp(-4 * delta_c)
APEX_NEAR = 0.05  # a test class within this cosine distance of a training class counts as seen (delta 0)


def class_distance_weights(
    training: torch.Tensor, classes: torch.Tensor, beta: float = APEX_BETA, near: float = APEX_NEAR
) -> torch.Tensor:
    """APEX's per-class weight of the adapter (``CustomCLIP.init_coeff``): for each class of the request, from its
    frozen text features [C, D] and the adapter's training labels' [B, D]: d_nn = max(0, 1 - the nearest
    training label's cosine), d_avg = 1 - the mean cosine, delta = d_avg if d_nn > near else 0, and the
    weight exp(-beta * delta) [C]: 1 for a class the adapter was trained on, less the farther a class is."""
    sims = classes @ training.to(classes).T  # [C, B]
    d_nn = (1 - sims.max(dim=1).values).clamp_min(0)
    d_avg = 1 - sims.mean(dim=1)
    delta = torch.where(d_nn > near, d_avg, torch.zeros_like(d_avg))
    return torch.exp(-beta * delta)


def blend_classes(frozen: torch.Tensor, adapted: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class features [C, D] blended class by class, ``weights`` [C] of the way toward the adapter's (APEX's
    w_c = a_c A(t_c) + (1 - a_c) t_c), renormalized."""
    w = weights.to(frozen).unsqueeze(1)
    return F.normalize(w * adapted + (1 - w) * frozen, dim=-1)


def blend(frozen: torch.Tensor, adapted: torch.Tensor, alpha: float) -> torch.Tensor:
    """Unit-norm features ``alpha`` of the way from the frozen model's to the adapter's (WiSE-style, in feature
    space as APEX blends): 0 gives the frozen features themselves, 1 the adapter's."""
    if alpha == 0.0:
        return frozen
    if alpha == 1.0:
        return adapted
    return F.normalize(frozen + alpha * (adapted - frozen), dim=-1)
