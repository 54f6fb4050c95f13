"""Serving through few-shot adapters, on the lanes: one named adapter, or ConDU's routing among several.

A named adapter gives each image its vision side's features and each class its text side's, both blended
toward the frozen model's by ``adapter_alpha`` (``adapters.fewshot.apply.blend``), or by APEX's
class-distance rule (``adapter_alpha: "class_distance"``, zero-shot only: each class weighted by its
distance to the adapter's training labels, the images by the mean weight); test-time methods then run on
those, so adaptation happens on top of the adapter (``AdaptedBackbone`` encodes the views, and prompt tuning
starts from a prompt adapter's learned context).

Routing (ConDU's task-agnostic inference, ``adapter: {"route": "auto"}``): each candidate's score for an
image is the highest cosine between the image's frozen features and the adapter's class prototypes; an
image uses its ``top_k`` best candidates whose score is at least ``min_sim``, and its logits are the plain
mean of the frozen model's and those experts' (ConDU's rule); with none, the frozen model answers alone.
Every candidate's logits are computed in one stacked computation over the batch's images (lora parts of
one rank stacked through the vision tower together), then each image takes the ones it chose.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, cast

import torch

from adapters.backbone import Backbone
from adapters.fewshot.apply import (
    adapter_class_features,
    adapter_image_features,
    blend,
    blend_classes,
    class_distance_weights,
    lora_factors_of,
)
from adapters.fewshot.artifact import route_scores, seen
from adapters.lowrank import LoraFactors
from adapters.prompts import PromptInputs
from server.engine.resident import Resident, ResidentAdapters
from server.engine.work import AdapterUse, Route, Work


class AdaptedBackbone:
    """The backbone as a test-time method sees it when served through an adapter: ``encode_images`` gives the
    adapter's (blended) image features, and with a prompt part ``prompt_inputs`` starts from the adapter's
    learned context (blended toward its ``ctx_init``), so prompt tuning continues from it: the TPT paper's
    CoOp + TPT. Everything else is the frozen backbone's."""

    def __init__(self, backbone: Backbone, resident: Resident, alpha: float):
        self._backbone = backbone
        self._adapter = resident.adapter
        self._alpha = alpha

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        frozen = self._backbone.encode_images(images)
        if "lora" not in self._adapter.card.parts:
            return frozen
        return blend(frozen, adapter_image_features(self._backbone, self._adapter, images), self._alpha)

    def prompt_inputs(self, labels: tuple[str, ...], ctx_init: str = "a photo of a") -> PromptInputs:
        """The adapter's prompts (its ``ctx_init``, whatever the method asks) with its learned context as the start."""
        card = self._adapter.card
        if "prompt" not in card.parts or card.ctx_init is None:
            return self._backbone.prompt_inputs(labels, ctx_init)
        inputs = self._backbone.prompt_inputs(labels, card.ctx_init)
        learned = self._adapter.tensors["prompt.ctx"].to(inputs.ctx_init)
        start = inputs.ctx_init + self._alpha * (learned - inputs.ctx_init) if self._alpha != 1.0 else learned
        return dataclasses.replace(inputs, ctx_init=start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backbone, name)


B = TypeVar("B", bound=Backbone)


def image_side(backbone: B, use: AdapterUse) -> B:
    """What a test-time method sees as the model: the frozen backbone, or the adapter's vision side and learned
    context when it has them."""
    resident = use.adapters[0]
    if use.routed or not {"lora", "prompt"} & set(resident.adapter.card.parts):
        return backbone
    return cast(B, AdaptedBackbone(backbone, resident, use.alpha))  # the same type, by delegation


def class_side(
    cache: ResidentAdapters, backbone: Backbone, resident: Resident, work: Work, frozen: torch.Tensor
) -> torch.Tensor:
    """The adapter's class features [C, D] for the work's labels (not blended), kept with the adapter."""
    key = work.class_text
    found = resident.class_features.get(key)
    if found is None:
        with torch.inference_mode():
            found = adapter_class_features(backbone, resident.adapter, work.labels, frozen)
        cache.remember(resident, key, found)
    return found


def named(
    cache: ResidentAdapters, backbone: Backbone, work: Work, feats: torch.Tensor, classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features [N, D] and class features [C, D] through the one named adapter, blended by alpha."""
    use = work.adapter
    assert use is not None and not use.routed
    resident = use.adapters[0]
    with torch.inference_mode():
        alpha, weights = use.alpha, None
        if use.class_distance:  # APEX: each class by its distance to the training labels, images by the mean
            tensors = resident.adapter.tensors
            training, shown = tensors["label_features"], seen(tensors["prototypes"])
            # APEX's training classes are those it had shots of; a label trained against but never shown is not.
            weights = class_distance_weights(training[shown] if bool(shown.any()) else training, classes)
            alpha = float(weights.mean())
        images = feats
        if "lora" in resident.adapter.card.parts:
            images = blend(feats, adapter_image_features(backbone, resident.adapter, work.images), alpha)
        adapted = class_side(cache, backbone, resident, work, classes)
        texts = blend(classes, adapted, alpha) if weights is None else blend_classes(classes, adapted, weights)
    return images, texts


def routed(
    cache: ResidentAdapters, backbone: Backbone, work: Work, feats: torch.Tensor, classes: torch.Tensor
) -> tuple[torch.Tensor, list[Route]]:
    """Route each image [N, D frozen features] to its experts: logits [N, C] (float32, CPU) and the routes."""
    use = work.adapter
    assert use is not None and use.routed and use.top_k is not None
    scale = backbone.logit_scale
    if not use.adapters:  # no candidates: the frozen model answers every image
        with torch.inference_mode():
            base = (scale * feats @ classes.T).float().cpu()
        return base, [Route((), -1.0) for _ in range(feats.shape[0])]
    with torch.inference_mode():
        scores = torch.stack([route_scores(feats, r.adapter.tensors["prototypes"]) for r in use.adapters])  # [R, N]
        chosen = torch.zeros_like(scores, dtype=torch.bool)  # [R, N]
        if use.top_k > 0:
            k = min(use.top_k, len(use.adapters))
            top = scores.topk(k, dim=0)
            chosen.scatter_(0, top.indices, top.values >= use.min_sim)
        base = scale * feats @ classes.T  # [N, C]
        total, count = base.clone(), torch.ones(feats.shape[0], 1, device=feats.device)
        needed = [i for i in range(len(use.adapters)) if chosen[i].any()]
        if needed:
            images = _expert_images(backbone, [use.adapters[i] for i in needed], work.images, feats, use.alpha)
            texts = torch.stack(
                [blend(classes, class_side(cache, backbone, use.adapters[i], work, classes), use.alpha) for i in needed]
            )  # [R', C, D]
            logits = scale * torch.einsum("rnd,rcd->rnc", images, texts)  # [R', N, C]: one stacked computation
            mask = chosen[needed].unsqueeze(-1).to(logits)  # [R', N, 1]
            total = total + (logits * mask).sum(0)
            count = count + mask.sum(0)
        out = (total / count).float().cpu()
    routes = []
    for n in range(feats.shape[0]):
        used = sorted(
            ((use.refs[i], float(scores[i, n])) for i in range(len(use.adapters)) if chosen[i, n]),
            key=lambda pair: -pair[1],
        )
        routes.append(Route(tuple(used), float(scores[:, n].max())))
    return out, routes


def _expert_images(
    backbone: Backbone, experts: list[Resident], images: torch.Tensor, frozen: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Each expert's image features [R, N, D]: the frozen ones for text-side experts; lora experts of one rank
    through the vision tower's adapted blocks as one stack."""
    out: list[torch.Tensor | None] = [None] * len(experts)
    groups: dict[tuple[int, float, int], list[int]] = {}
    for i, resident in enumerate(experts):
        adapter = resident.adapter
        if "lora" not in adapter.card.parts:
            out[i] = frozen
            continue
        factors = lora_factors_of(backbone, adapter)
        groups.setdefault((factors.rank, factors.alpha, len(factors.targets)), []).append(i)
    for members in groups.values():
        stacked = LoraFactors.stack([lora_factors_of(backbone, experts[i].adapter) for i in members])
        targets = stacked.targets
        prefix = backbone.vision_prefix(images, targets)  # [N, ...], once for the group
        feats = backbone.vision_suffix(prefix.expand(len(members), *prefix.shape), stacked)  # [R, N, D]
        for j, i in enumerate(members):
            out[i] = blend(frozen, feats[j], alpha)
    return torch.stack([t for t in out if t is not None])
