"""TPT: Test-time Prompt Tuning (Shu et al., NeurIPS 2022, https://arxiv.org/abs/2209.07511).

Per request, 4 context tokens initialised from "a photo of a" are tuned by one AdamW step (lr
5e-3) that minimises the entropy of the averaged prediction over the 10% most confident of 64
views (63 random resized crops with flips, plus the image); the prediction is the base view
against the class prompts re-encoded with the tuned context. Gradients flow through the text
tower only.

How ours differs from the official code (azshue/TPT):

- The view features are encoded once and reused by every step and by the final prediction (TPT
  re-encodes them; same result, less work). The confident views are chosen on the first step and
  kept, as TPT does.
- The text context is cut to the longest prompt of the label set, which is exact for CLIP's
  causal text tower; class prompts are ``"a photo of a {label}."`` whatever templates the request
  names, as in TPT, so zero steps equal zero-shot with the ``simple`` template.
- Views are cropped from a tensor without PIL's antialiasing (see adapters/views.py); no AMP grad
  scaler (CPU fp32; on GPU the context and optimizer stay fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapters.base import AdaptInput, AdaptResult, Method, register
from adapters.common import EpisodicOptions, optimize
from adapters.losses import dispersion, marginal_entropy, select_confident


@dataclass(frozen=True)
class PromptOptions(EpisodicOptions):
    ctx_init: str = "a photo of a"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ctx_init.strip():
            raise ValueError("ctx_init must not be empty")


class PromptTuning(Method):
    """TPT's loop; ``dispersion_weight`` adds C-TPT's calibration term."""

    def dispersion_weight(self, options: Any) -> float:
        return 0.0

    def adapt(self, inp: AdaptInput, options: Any) -> AdaptResult:
        backbone = inp.backbone
        try:
            prompts = backbone.prompt_inputs(inp.labels, options.ctx_init)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from exc
        ctx = prompts.ctx_init.clone().requires_grad_(True)  # [n_ctx, W]
        feats = inp.view_features  # [V, D]
        weight = self.dispersion_weight(options)
        chosen: list[torch.Tensor] = []

        def loss(step: int) -> torch.Tensor:
            text = backbone.encode_text_with_context(ctx, prompts)  # [C, D]
            logits = inp.logit_scale * feats @ text.T  # [V, C]
            if not chosen:  # TPT selects on the first step and keeps the selection
                chosen.append(select_confident(logits.detach(), options.selection))
            value = marginal_entropy(logits[chosen[0]])
            if weight:
                value = value - weight * dispersion(text)
            return value

        steps = optimize([ctx], options.lr, options.steps, loss)
        with torch.no_grad():
            text = backbone.encode_text_with_context(ctx, prompts)  # [C, D]
            final = inp.logit_scale * feats[0] @ text.T  # [C]
        return AdaptResult(final, steps=steps, selected_views=len(chosen[0]) if chosen else 1,
                           state={"ctx": ctx.detach()})


@register
class TPT(PromptTuning):
    name = "tpt"
    summary = "Tune 4 prompt-context tokens per request by entropy minimisation over confident augmented views."

    @dataclass(frozen=True)
    class Options(PromptOptions):
        pass
