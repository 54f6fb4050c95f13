"""TTL: Test-Time Low-rank adaptation (Imam et al., 2024, https://arxiv.org/abs/2407.15913).

Per request, LoRA factors (rank 16, alpha 32; A xavier-normal, B zero) on the q and v projections
of the last three vision blocks are trained by one AdamW step (lr 5e-3) on TTL's confidence-weighted
entropy over all 64 views, H_i * exp(-(H_i - 0.4)) with the weights detached; the prediction is the
base view through the adapted blocks. On open_clip's ResNet tower the attention pool's q and v
projections are adapted instead. The frozen weights are never touched: the low-rank terms are added
in a functional re-run of the adapted blocks (server/lowrank.py).

How ours differs from the official code (Razaimam45/TTL-Test-Time-Low-Rank-Adaptation):

- open_clip instead of Hugging Face CLIP; q and v are slices of open_clip's packed in_proj weight.
- The views go through the frozen blocks once; each step re-runs only the adapted blocks (exact:
  nothing before them changes). TTL re-encodes every view through the whole tower.
- A is drawn per request from the request's seeded generator; TTL draws it once per process from
  the global generator and resets every image to it. Text features are the request's template
  ensemble, cached (TTL re-encodes "a photo of a {label}." every step, under no_grad).
- No LoRA dropout: TTL's 0.05 is inactive anyway, since its model is in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapters.base import AdaptInput, AdaptResult, Method, register
from adapters.common import MAX_STEPS, MAX_VIEWS, check_range, optimize
from adapters.losses import TTL_MAX_ENTROPY, entropy, ttl_weighted_entropy
from server.lowrank import LoraFactors


@register
class TTL(Method):
    name = "ttl"
    summary = "Train per-request LoRA on the last vision blocks' q/v by confidence-weighted entropy over views."

    @dataclass(frozen=True)
    class Options:
        views: int = 64
        steps: int = 1
        lr: float = 5e-3
        rank: int = 16
        alpha: float = 32.0
        blocks: int = 3
        tau: float = 0.4

        def __post_init__(self) -> None:
            check_range("views", self.views, 1, MAX_VIEWS)
            check_range("steps", self.steps, 0, MAX_STEPS)
            check_range("lr", self.lr, 0.0, 10.0)
            check_range("rank", self.rank, 1, 256)
            check_range("alpha", self.alpha, 0.0, 1e4)
            check_range("blocks", self.blocks, 1, 64)
            check_range("tau", self.tau, 0.0, 100.0)

    def adapt(self, inp: AdaptInput, options: Any) -> AdaptResult:
        backbone = inp.backbone
        assert inp.views is not None, "ttl re-runs the vision tower: the engine passes the views"
        targets = backbone.lora_targets(options.blocks)
        prefix = backbone.vision_prefix(inp.views, targets)  # [V, ...] frozen up to the first adapted block
        lora = LoraFactors.init(targets, options.rank, options.alpha, generator=inp.generator,
                                device=backbone.device)
        classes = inp.class_features  # [C, D]
        kept = [inp.view_features.shape[0]]

        def loss(step: int) -> torch.Tensor | None:
            logits = inp.logit_scale * backbone.vision_suffix(prefix, lora) @ classes.T  # [V, C]
            passing = int((entropy(logits.detach()) <= TTL_MAX_ENTROPY).sum())
            kept[0] = passing
            if passing == 0:  # TTL skips the step; AdamW's weight decay would still move A
                return None
            return ttl_weighted_entropy(logits, options.tau)

        steps = optimize(lora.parameters(), options.lr, options.steps, loss)
        with torch.no_grad():
            final = inp.logit_scale * backbone.vision_suffix(prefix[:1], lora)[0] @ classes.T  # [C]
        state = {f"a{i}": a.detach() for i, a in enumerate(lora.a)}
        state |= {f"b{i}": b.detach() for i, b in enumerate(lora.b)}
        return AdaptResult(final, steps=steps, selected_views=kept[0], state=state)
