"""TPS: Test-time Prototype Shifting (Sui, Wang and Yeung-Levy, 2024, https://arxiv.org/abs/2403.12952).

Per request, a zero-initialised shift per class is added to the class prototypes in embedding space
and trained to minimise the marginal entropy of the most confident views; the text encoder never
runs at test time, so a step costs one [V, C] matmul and its backward. The prediction is the base
view against the shifted prototypes.

How ours differs from the official code (elaine-sui/TPS):

- Prototypes are the request's class features: the renormalised mean over its templates, so the
  zero-step prediction equals zero-shot. When the request names a label set with descriptions, a
  described label's prototype is TPS's "micro" pooling, (template mean + description mean) / 2,
  renormalised, with description prompts "{label}, which is/has {description}": the description
  head every method shares (adapters/descriptions.py, built by the engine), at TPS's default
  ``descriptions.mix`` of 0.5. TPS averages 80 templates and GPT-4 descriptors without
  renormalising; we use the request's templates and the label set's own descriptions.
- The view features are encoded once and reused by every step (TPS re-encodes them each step,
  which changes nothing but the cost); views are re-selected every step, as TPS does.
- The model's own logit scale, not a hard-coded 100; fp32 throughout on CPU.
- Images of concurrent requests are adapted together (``adapt_batch``), each with its own shift and
  loss; the summed loss gives each shift exactly its own gradient.
- Views: TPS's scripts use AugMix on the fine-grained sets and crops with flips on the ImageNet family
  (``augmix=len(set_id) > 1``, as TPT); ``augmentation`` chooses, default ``crop_flip``.
- Additions of ours, off by default: the anchor regularizers ``feature`` (on the prototypes) and
  ``l2sp`` (on the shifts), which act from the second step (adapters/regularizers.py), and the
  ensemble with zero-shot (adapters/ensemble.py). The report's ``drift`` is the mean 1 - cos between
  the shifted and the initial prototypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from adapters.base import AdaptInput, AdaptResult, Method, register
from adapters.common import EpisodicOptions, optimize
from adapters.descriptions import MICRO_PROTOTYPES, DescriptionOptions
from adapters.losses import marginal_entropy, select_confident
from adapters.regularizers import divergence_curvature, feature_drift


@dataclass(frozen=True)
class TPSOptions(EpisodicOptions):
    """TPT's episodic options (views, selection, steps, lr); described prototypes by default (mix 0.5)."""

    descriptions: DescriptionOptions = MICRO_PROTOTYPES


@register
class TPS(Method[TPSOptions]):
    name = "tps"
    summary = "Shift each class prototype in embedding space by entropy minimisation over confident views."
    Options = TPSOptions
    regularizer_kinds: ClassVar[dict[str, str]] = {"feature": "the class prototypes", "l2sp": "the prototype shifts"}

    def adapt(self, inp: AdaptInput, options: TPSOptions) -> AdaptResult:
        return self.adapt_batch([inp], options)[0]

    def adapt_batch(self, inputs: Sequence[AdaptInput], options: TPSOptions) -> list[AdaptResult]:
        """Each image's own shift, one optimizer over all of them (see ``adapters.common.optimize``)."""
        protos = [F.normalize(inp.class_features, dim=-1) for inp in inputs]  # each [C_r, D]
        shifts = [torch.zeros_like(p, requires_grad=True) for p in protos]  # each [C_r, D], the image's parameter
        selected = [1] * len(inputs)
        reg = options.regularizers
        # Each image's pull weight from ``feature``, w * drift / ||shift||^2, at its latest step.
        pulled = [0.0] * len(inputs)

        def logits(r: int, rows: slice | int = slice(None)) -> torch.Tensor:
            inp = inputs[r]
            return inp.logit_scale * inp.view_features[rows] @ F.normalize(protos[r] + shifts[r], dim=-1).T

        def loss(step: int) -> list[torch.Tensor | None]:
            out: list[torch.Tensor | None] = []
            for r in range(len(inputs)):
                view_logits = logits(r)  # [V, C_r]
                idx = select_confident(view_logits.detach(), options.selection)
                selected[r] = len(idx)
                value = marginal_entropy(view_logits[idx])
                # The anchor regularizers (adapters/regularizers.py) are not loss terms: the optimizer pulls the
                # parameters toward their start (optimize). At the first step they are at their start (every
                # divergence and distance 0), so nothing is computed there;
                # ``feature`` pulls with the weight w * drift / ||shift||^2 (regularizers.py).
                if step and reg.feature:
                    with torch.no_grad():
                        drift = feature_drift(F.normalize(protos[r] + shifts[r], dim=-1), protos[r])
                        pulled[r] = reg.feature * divergence_curvature(
                            drift, [shifts[r]], [torch.zeros_like(shifts[r])]
                        )
                out.append(value)
            return out

        steps = optimize(
            [[s] for s in shifts],
            options.lr,
            options.steps,
            loss,
            stop=lambda: all(inp.stop() for inp in inputs),
            anchor=[[torch.zeros_like(s)] for s in shifts],  # l2sp, feature: a pull toward the start after each step
            anchor_weight=lambda r: reg.l2sp + pulled[r],
        )
        with torch.no_grad():
            return [
                AdaptResult(
                    logits(r, 0),
                    steps=steps[r],
                    selected_views=selected[r] if steps[r] else 1,
                    extra={"drift": float(feature_drift(F.normalize(protos[r] + shifts[r], dim=-1), protos[r]))},
                    state={"shift": shifts[r].detach()},
                )
                for r in range(len(inputs))
            ]
