"""TPS: Test-time Prototype Shifting (Sui, Wang and Yeung-Levy, 2024, https://arxiv.org/abs/2403.12952).

Per request, a zero-initialised shift per class is added to the class prototypes in embedding space
and trained to minimise the marginal entropy of the most confident views; the text encoder never
runs at test time, so a step costs one [V, C] matmul and its backward. The prediction is the base
view against the shifted prototypes.

How ours differs from the official code (elaine-sui/TPS):

- Prototypes are the request's class features: the renormalised mean over its templates, so the
  zero-step prediction equals zero-shot. TPS averages 80 templates without renormalising, and
  adds GPT-4 descriptor means; label-set descriptions are not used yet.
- The view features are encoded once and reused by every step (TPS re-encodes them each step,
  which changes nothing but the cost); views are re-selected every step, as TPS does.
- The model's own logit scale, not a hard-coded 100; fp32 throughout on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from adapters.base import AdaptInput, AdaptResult, Method, register
from adapters.common import EpisodicOptions, optimize
from adapters.losses import marginal_entropy, select_confident


@register
class TPS(Method):
    name = "tps"
    summary = "Shift each class prototype in embedding space by entropy minimisation over confident views."

    @dataclass(frozen=True)
    class Options(EpisodicOptions):
        pass

    def adapt(self, inp: AdaptInput, options: Any) -> AdaptResult:
        feats = inp.view_features  # [V, D]
        protos = F.normalize(inp.class_features, dim=-1)  # [C, D]
        shift = torch.zeros_like(protos, requires_grad=True)  # [C, D], the request's only parameter
        selected = [1]

        def loss(step: int) -> torch.Tensor:
            logits = inp.logit_scale * feats @ F.normalize(protos + shift, dim=-1).T  # [V, C]
            idx = select_confident(logits.detach(), options.selection)
            selected[0] = len(idx)
            return marginal_entropy(logits[idx])

        steps = optimize([shift], options.lr, options.steps, loss)
        with torch.no_grad():
            final = inp.logit_scale * feats[0] @ F.normalize(protos + shift, dim=-1).T  # [C]
        return AdaptResult(final, steps=steps, selected_views=selected[0] if steps else 1,
                           state={"shift": shift.detach()})
