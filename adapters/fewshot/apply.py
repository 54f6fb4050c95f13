"""An adapter applied to the frozen model: the image features and class features it gives, and the blend toward
zero-shot (``adapter_alpha``).

The model is never changed: the prompt part runs the text tower with its learned context spliced in
(``Backbone.encode_text_with_contexts``), the lora part runs the vision tower's last blocks with its
update added (``Backbone.vision_suffix``), and the text adapter maps the class features after. Training
(``adapters.fewshot.train``), the server's lanes and the benchmarks call these same functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from adapters.backbone import Backbone
from adapters.fewshot.artifact import Adapter


def adapter_image_features(backbone: Backbone, adapter: Adapter, images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] preprocessed images -> [N, D] unit-norm features through the adapter's vision side
    (the frozen tower's own features when it has no lora part)."""
    if "lora" not in adapter.card.parts:
        return backbone.encode_images(images)
    targets = backbone.lora_targets(int(adapter.card.training.get("lora_blocks", 3)))
    factors = adapter.lora_factors(targets)
    return backbone.vision_suffix(backbone.vision_prefix(images, targets), factors)


def adapter_class_features(
    backbone: Backbone, adapter: Adapter, labels: Sequence[str], frozen: torch.Tensor
) -> torch.Tensor:
    """The class features [C, D] of ``labels`` through the adapter's text side; ``frozen`` [C, D] are the
    labels' zero-shot features (their templates' ensemble), which a prompt part replaces and the text
    adapter maps."""
    features = frozen
    if "prompt" in adapter.card.parts:
        inputs = backbone.prompt_inputs(tuple(labels), adapter.card.ctx_init or "a photo of a")
        ctx = adapter.tensors["prompt.ctx"].to(inputs.ctx_init)
        features = backbone.encode_text_with_contexts(ctx.unsqueeze(0), [inputs])[0]
    return adapter.adapt_text(features)


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
