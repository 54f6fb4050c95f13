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
- Images of concurrent requests are tuned together (``adapt_batch``): each has its own context and
  loss, their label sets' prompts run through the text tower as one batch, and the summed loss gives
  each context exactly its own gradient.
- Views are cropped from a tensor without PIL's antialiasing (see adapters/views.py); no AMP grad
  scaler (CPU fp32; on GPU the context and optimizer stay fp32).
- Views: the paper uses AugMix on the fine-grained (cross-dataset) sets and plain random resized
  crops with flips on ImageNet and its shifts (``augmix=len(set_id) > 1``); ``augmentation`` chooses,
  default ``crop_flip`` (adapters/augmix.py follows the official AugMix pipeline).
- ``ctx_init``: as the official code, underscores become spaces and the learned context is one vector
  per word (``n_ctx = len(ctx_init.split(" "))``): "itap of a" learns 3 vectors (the tokens "it",
  "ap", "of"; "a" stays frozen in the prompt), "a photo of a" 4. Class names are not changed: the
  official code turns their underscores into spaces, ours uses the label as sent, the same text its
  zero-shot classifier reads, so zero steps equal zero-shot (send "golden retriever", not "golden_retriever").
- Additions of ours, off by default: with a label set's descriptions, the class embeddings the loss
  and the prediction use go through the description head (``descriptions.mix``) and MSTA's
  consistency term keeps each tuned class embedding near its frozen description embedding
  (``descriptions.consistency``; adapters/descriptions.py); the anchor regularizers ``feature`` (on
  the class text features) and ``l2sp`` (on the context), which act from the second step
  (adapters/regularizers.py); the ensemble with zero-shot (adapters/ensemble.py). The report's
  ``drift`` is the mean 1 - cos between the tuned and the initial class text features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from adapters.backbone import TPT_CTX_INIT, UnsupportedModel
from adapters.base import AdaptInput, AdaptResult, Cost, Method, register
from adapters.common import EpisodicOptions, optimize
from adapters.descriptions import consistency
from adapters.descriptions import head as description_head
from adapters.losses import dispersion, marginal_entropy, select_confident
from adapters.regularizers import feature_drift

# A prompt context is a few words ("a photo of a"); it and the label share CLIP's 77 tokens.
MAX_CTX_INIT_CHARS = 200


@dataclass(frozen=True)
class PromptOptions(EpisodicOptions):
    ctx_init: str = TPT_CTX_INIT

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ctx_init.strip():
            raise ValueError("ctx_init must not be empty")
        if len(self.ctx_init) > MAX_CTX_INIT_CHARS:  # checked before the request queues: tokenizing is quadratic
            raise ValueError(f"ctx_init has {len(self.ctx_init)} characters; the limit is {MAX_CTX_INIT_CHARS}")


PromptOptionsT = TypeVar("PromptOptionsT", bound=PromptOptions)


class PromptTuning(Method[PromptOptionsT]):
    """TPT's loop; ``dispersion_weight`` adds C-TPT's calibration term."""

    regularizer_kinds: ClassVar[dict[str, str]] = {"feature": "the class text features", "l2sp": "the prompt context"}
    adapts_text = True

    def dispersion_weight(self, options: PromptOptionsT) -> float:
        return 0.0

    @staticmethod
    def head(texts: torch.Tensor, inp: AdaptInput, options: PromptOptionsT) -> torch.Tensor:
        """[C, D] tuned class features through the description head; unchanged (bit for bit) without one."""
        if inp.descriptions is None or not options.descriptions.mix:
            return texts
        return description_head(texts, inp.descriptions, options.descriptions.mix)

    def cost(self, options: PromptOptionsT, n_classes: int) -> Cost:
        # Views once; the text tower forward and backward per step, and forward once more to predict.
        # One step's graph at a time: the activations of every class's prompt until its backward pass.
        return Cost(
            image_passes=float(options.views),
            prompt_passes=float(n_classes * (3 * options.steps + 1)),
            kept_prompts=float(n_classes) if options.steps else 0.0,
        )

    def adapt(self, inp: AdaptInput, options: PromptOptionsT) -> AdaptResult:
        return self.adapt_batch([inp], options)[0]

    def adapt_batch(self, inputs: Sequence[AdaptInput], options: PromptOptionsT) -> list[AdaptResult]:
        """Each image's own context, all label sets through the text tower in one batch per step."""
        backbone = inputs[0].backbone
        try:
            prompts = [backbone.prompt_inputs(inp.labels, options.ctx_init) for inp in inputs]
        except UnsupportedModel as exc:
            raise UnsupportedModel(f"{self.name}: {exc}") from exc
        ctxs = [p.ctx_init.clone().requires_grad_(True) for p in prompts]  # each [n_ctx, W], the image's parameter
        weight = self.dispersion_weight(options)
        reg, described = options.regularizers, options.descriptions
        chosen: list[torch.Tensor | None] = [None] * len(inputs)
        frozen: list[torch.Tensor | None] = [None] * len(inputs)  # each [C_r, D], the prompts with ctx_init

        def loss(step: int) -> list[torch.Tensor | None]:
            texts = backbone.encode_text_with_contexts(torch.stack(ctxs), prompts)  # R x [C_r, D]
            out: list[torch.Tensor | None] = []
            for r, inp in enumerate(inputs):
                start = frozen[r]
                if start is None:  # the first step's texts are the frozen ones: the context has not moved
                    start = frozen[r] = texts[r].detach()
                head = self.head(texts[r], inp, options)  # [C_r, D]
                logits = inp.logit_scale * inp.view_features @ head.T  # [V, C_r]
                picked = chosen[r]
                if picked is None:  # TPT selects on the first step and keeps the selection
                    picked = chosen[r] = select_confident(logits.detach(), options.selection)
                value = marginal_entropy(logits[picked])
                if weight:
                    value = value - weight * dispersion(texts[r])
                if described.consistency and inp.descriptions is not None:
                    value = value + described.consistency_weight * consistency(texts[r], inp.descriptions)
                # The anchor regularizers (adapters/regularizers.py) are 0 with a zero gradient at the first step
                # (the adapted model is the frozen one), so they are left out of it: computed, rounding would
                # leave a ~1e-8 gradient that Adam's first step, lr * sign(gradient), turns into a full step.
                # ``l2sp`` is not a loss term: the optimizer pulls the parameters toward their start (optimize).
                if step and reg.feature:
                    value = value + reg.feature * feature_drift(texts[r], start)
                out.append(value)
            return out

        steps = optimize(
            [[c] for c in ctxs],
            options.lr,
            options.steps,
            loss,
            stop=lambda: all(inp.stop() for inp in inputs),
            anchor=[[p.ctx_init] for p in prompts],  # l2sp: a pull toward the start after each step (optimize)
            anchor_weight=reg.l2sp,
        )
        with torch.no_grad():
            texts = backbone.encode_text_with_contexts(torch.stack(ctxs), prompts)
            results = []
            for r, inp in enumerate(inputs):
                start = frozen[r]
                drift = float(feature_drift(texts[r], start)) if start is not None else 0.0
                head = self.head(texts[r], inp, options)
                results.append(
                    AdaptResult(
                        inp.logit_scale * inp.view_features[0] @ head.T,
                        steps=steps[r],
                        selected_views=len(picked) if (picked := chosen[r]) is not None else 1,
                        extra={"drift": drift},
                        state={"ctx": ctxs[r].detach()},
                    )
                )
            return results


@register
class TPT(PromptTuning[PromptOptions]):
    name = "tpt"
    summary = "Tune 4 prompt-context tokens per request by entropy minimisation over confident augmented views."
    Options = PromptOptions
