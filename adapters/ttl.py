"""TTL: Test-Time Low-rank adaptation (Imam et al., 2024, https://arxiv.org/abs/2407.15913).

Per request, LoRA factors (rank 16, alpha 32; A xavier-normal, B zero) on the q and v projections
of the last three vision blocks are trained by one AdamW step (lr 5e-3) on TTL's confidence-weighted
entropy over all 64 views, H_i * exp(-(H_i - 0.4)) with the weights detached; the prediction is the
base view through the adapted blocks. On open_clip's ResNet tower the attention pool's q and v
projections are adapted instead. The frozen weights are never touched: the low-rank terms are added
in a functional re-run of the adapted blocks (``Backbone.vision_suffix``).

How ours differs from the official code (Razaimam45/TTL-Test-Time-Low-Rank-Adaptation):

- open_clip instead of Hugging Face CLIP; q and v are slices of open_clip's packed in_proj weight.
- The views go through the frozen blocks once; each step re-runs only the adapted blocks (exact:
  nothing before them changes). TTL re-encodes every view through the whole tower.
  The backbone runs the blocks functionally with the low-rank terms added (server/clip/lowrank.py).
- A is drawn per request from the request's seeded generator; TTL draws it once per process from
  the global generator and resets every image to it. Text features are the request's template
  ensemble, cached (TTL re-encodes "a photo of a {label}." every step, under no_grad).
- One pass of the views: the engine keeps the activations entering the first adapted block, and
  the zero-shot features come from the adapted blocks with B = 0. Images of concurrent requests
  are adapted together, each with its own factors and loss (``adapt_batch``).
- No LoRA dropout: TTL's 0.05 is inactive anyway, since its model is in eval mode.
- Steps: ``steps=N`` takes N AdamW steps. The official code takes N squared: its DeYO loop
  (``deyo.DeYO(..., steps=args.tta_steps)``, which steps ``tta_steps`` times) sits inside
  ``test_time_tuning``'s own ``for j in range(args.tta_steps)``. We keep N; the official
  ``tta_steps=3`` equals our ``steps=9`` (its default ``tta_steps=1`` equals our default ``steps=1``).
- Precision: the official code runs each step under ``torch.cuda.amp.autocast()`` (fp16) with a
  ``GradScaler(init_scale=1000)``. Ours uses neither: the tower runs in the model's precision
  (``TTA_PRECISION``) and the LoRA factors and AdamW state stay fp32, so no loss scaling is needed.
- Views: the official script turns AugMix on for the fine-grained sets (``augmix=len(set_id) > 1``)
  and off for the ImageNet family; ``augmentation`` chooses (default ``crop_flip``; see adapters/augmix.py).
- Additions of ours, off by default: the anchor regularizers (adapters/regularizers.py: ``feature`` on
  the views' image features, ``anchor_kl``, ``l2sp`` on the factors; they act from the second step),
  and the ensemble with zero-shot (adapters/ensemble.py). The report's ``drift`` is 1 - cos between
  the base view's adapted and frozen features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from adapters.backbone import Backbone
from adapters.base import AdaptInput, AdaptResult, Cost, Method, MethodOptions, register
from adapters.common import MAX_STEPS, MAX_VIEWS, Augmentation, check_range, optimize
from adapters.ensemble import NO_ENSEMBLE, EnsembleOptions
from adapters.losses import TTL_MAX_ENTROPY, entropy, ttl_weighted_entropy
from adapters.lowrank import LoraFactors
from adapters.regularizers import NO_REGULARIZERS, RegularizerOptions, anchor_kl, divergence_curvature, feature_drift


@dataclass(frozen=True)
class TTLOptions(MethodOptions):
    views: int = 64
    steps: int = 1
    lr: float = 5e-3
    rank: int = 16
    alpha: float = 32.0
    blocks: int = 3
    tau: float = 0.4
    augmentation: Augmentation = "crop_flip"
    ensemble: EnsembleOptions = NO_ENSEMBLE
    regularizers: RegularizerOptions = NO_REGULARIZERS

    def __post_init__(self) -> None:
        check_range("views", self.views, 1, MAX_VIEWS)
        check_range("steps", self.steps, 0, MAX_STEPS)
        check_range("lr", self.lr, 0.0, 10.0)
        check_range("rank", self.rank, 1, 256)
        check_range("alpha", self.alpha, 0.0, 1e4)
        check_range("blocks", self.blocks, 1, 64)
        check_range("tau", self.tau, 0.0, 100.0)


@register
class TTL(Method[TTLOptions]):
    name = "ttl"
    summary = "Train per-request LoRA on the last vision blocks' q/v by confidence-weighted entropy over views."
    Options = TTLOptions
    adapts_vision_tower = True
    regularizer_kinds: ClassVar[dict[str, str]] = {
        "feature": "the views' image features",
        "anchor_kl": "the views' distributions over the anchor texts",
        "l2sp": "the LoRA factors",
    }

    def cost(self, options: TTLOptions, n_classes: int) -> Cost:
        # One pass of the views; per step the adapted blocks forward and backward (at most the tower).
        # Kept: the adapted blocks' activations for the backward pass, and the cached tokens entering them.
        share = min(1.0, options.blocks / 12)
        return Cost(
            image_passes=float(options.views * (1 + 3 * options.steps * share)),
            kept_images=float(options.views * min(1.0, share + 1 / 12)),
        )

    def encode_views(
        self, backbone: Backbone, views: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """One pass: the frozen prefix, kept for every step, then the suffix with B = 0 for the features.

        ``encode_views`` options are not known here, so the prefix is cut at TTL's default three blocks
        and ``adapt`` recomputes it when a request asks for another count.
        """
        targets = backbone.lora_targets(TTLOptions.blocks)
        sizes = [v.shape[0] for v in views]
        prefix = backbone.vision_prefix(torch.cat(list(views)), targets)  # [sum V, ...]
        with torch.no_grad():
            feats = backbone.vision_suffix(prefix, LoraFactors.frozen(targets, backbone.device))  # [sum V, D]
        return [
            (f, {"prefix": p, "blocks": TTLOptions.blocks})
            for f, p in zip(torch.split(feats, sizes), torch.split(prefix, sizes), strict=True)
        ]

    def adapt(self, inp: AdaptInput, options: TTLOptions) -> AdaptResult:
        return self.adapt_batch([inp], options)[0]

    def adapt_batch(self, inputs: Sequence[AdaptInput], options: TTLOptions) -> list[AdaptResult]:
        """Each image's own factors, stacked; the adapted blocks run once per step for all images."""
        backbone = inputs[0].backbone
        targets = backbone.lora_targets(options.blocks)
        prefixes = []
        for inp in inputs:
            cached = inp.cache.get("prefix") if inp.cache.get("blocks") == options.blocks else None
            if cached is None:
                assert inp.views is not None, "ttl re-runs the vision tower: the engine passes the views"
                cached = backbone.vision_prefix(inp.views, targets)
            prefixes.append(cached)
        prefix = torch.stack(prefixes)  # [R, V, ...] frozen up to the first adapted block
        loras = [
            LoraFactors.init(targets, options.rank, options.alpha, generator=inp.generator, device=backbone.device)
            for inp in inputs
        ]
        stacked = [LoraFactors.stack(loras)]  # rebuilt from the leaves at every step
        kept = [inp.view_features.shape[0] for inp in inputs]
        reg = options.regularizers
        starts = [[p.detach().clone() for p in lora.parameters()] for lora in loras] if reg.asked() else []
        # Each image's pull weight from feature and anchor_kl, w * divergence / ||p - p0||^2, at its latest step.
        pulled = [0.0] * len(inputs)

        def loss(step: int) -> list[torch.Tensor | None]:
            stacked[0] = LoraFactors.stack(loras)
            feats = backbone.vision_suffix(prefix, stacked[0])  # [R, V, D]
            out: list[torch.Tensor | None] = []
            for r, inp in enumerate(inputs):
                logits = inp.logit_scale * feats[r] @ inp.class_features.T  # [V, C_r]
                kept[r] = int((entropy(logits.detach()) <= TTL_MAX_ENTROPY).sum())
                # TTL skips the step when no view passes; AdamW's weight decay would still move A.
                if not kept[r]:
                    out.append(None)
                    continue
                value = ttl_weighted_entropy(logits, options.tau)
                # The anchor regularizers (adapters/regularizers.py) are not loss terms: the optimizer pulls the
                # parameters toward their start (optimize). At the first step they are at their start (every
                # divergence and distance 0), so nothing is computed there;
                # ``feature`` and ``anchor_kl`` pull with the weight w * divergence / ||p - p0||^2 (regularizers.py).
                if step and (reg.feature or reg.anchor_kl):
                    with torch.no_grad():
                        pulled[r] = 0.0
                        if reg.feature:
                            drift = feature_drift(feats[r], inp.view_features)
                            pulled[r] += reg.feature * divergence_curvature(drift, loras[r].parameters(), starts[r])
                        if reg.anchor_kl and inp.anchors is not None:
                            kl = anchor_kl(feats[r], inp.view_features, inp.anchors, inp.logit_scale)
                            pulled[r] += reg.anchor_kl * divergence_curvature(kl, loras[r].parameters(), starts[r])
                out.append(value)
            return out

        steps = optimize(
            [lora.parameters() for lora in loras],
            options.lr,
            options.steps,
            loss,
            stop=lambda: all(inp.stop() for inp in inputs),
            anchor=starts,  # the regularizers: a pull toward the start after each step (adapters.common.optimize)
            anchor_weight=lambda r: reg.l2sp + pulled[r],
        )
        with torch.no_grad():
            feats = backbone.vision_suffix(prefix[:, :1], LoraFactors.stack(loras))[:, 0]  # [R, D] base views
            results = []
            for r, (inp, lora) in enumerate(zip(inputs, loras, strict=True)):
                state = {f"a{i}": a.detach() for i, a in enumerate(lora.a)}
                state |= {f"b{i}": b.detach() for i, b in enumerate(lora.b)}
                results.append(
                    AdaptResult(
                        inp.logit_scale * feats[r] @ inp.class_features.T,
                        steps=steps[r],
                        selected_views=kept[r],
                        extra={"drift": float(feature_drift(feats[r : r + 1], inp.view_features[:1]))},
                        state=state,
                    )
                )
            return results
