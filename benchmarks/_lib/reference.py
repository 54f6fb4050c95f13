"""The published test-time methods as their official code runs them: the baseline our methods are held to.

One reference per method, written from the official repositories (commits read in
``shared/research/tta_methods.md``):

- TPT: azshue/TPT (``tpt_classification.py``, ``clip/custom_clip.py``: PromptLearner, TextEncoder)
- C-TPT: hee-suk-yoon/C-TPT (TPT plus ``l2_norm_mean_training``, the ATFD term)
- TTL: Razaimam45/TTL-Test-Time-Low-Rank-Adaptation (``ttl.py``, ``deyo.py: forward_and_adapt_sar``)
- TPS: elaine-sui/TPS (``shift_classification.py``, ``model/learnable_shift.py``)
- ZERO: FarinaMatteo/zero (``ttas/zero.py``, ``ttas/base.py: confidence_filter``, ``utils/tools.py: greedy_break``)

tests/unit/test_parity.py checks our methods against these within 1e-5, and
benchmarks/adaptation_latency.py times them beside ours.

"As published" means the official per-image loop and its cost: one image at a time; the state (prompt
context, LoRA factors, prototype shift) reset and a fresh AdamW (torch defaults: betas (0.9, 0.999),
weight decay 0.01) for every image; every view re-encoded through the whole image encoder at every
step, and the base view encoded again for the prediction. TPT and C-TPT run the class prompts through
the whole text transformer at the full context (77 tokens for CLIP) at every step and again for the
prediction. TTL merges its LoRA into the q and v rows of the packed in-projection weights and re-runs
the whole vision tower on every view at every step (what PEFT's layers compute, unmerged), and
re-encodes the class prompts under no_grad at every forward, as its ClipTestTimeTuning does. TPS and
ZERO compute the class text once per label set (TPS offline, ZERO with ``cache_text_features``); the
callers here do that once per label set too.

Where these depart from the official code, and why:

- open_clip models instead of OpenAI's ``clip`` or Hugging Face's CLIPModel, run in the loaded model's
  own dtype (fp32 on the CPU; the bf16 weights on a GPU) without autocast or a GradScaler, so that a
  comparison with ours measures the algorithm, not the precision. A GradScaler multiplies the loss and
  divides the gradients back before AdamW: beyond rounding and skipped overflow steps it changes nothing.
- The views are ours (``adapters.views.make_views`` from the request's seeded generator; see
  ``request_views``), so both sides see the same pixels. The official views are PIL crops drawn from
  the global RNG. AugMix is off, TPT's rule for the ImageNet family.
- The confident views are sorted stably and at least one is kept: ``int(N * rho)`` keeps none below
  10 views at rho = 0.1, which makes the published loss NaN. Per-view entropies use ``log_softmax``
  (TPT, DeYO); ZERO's ``probs.log()`` gives NaN where a probability underflows to 0.
- TTL's A is drawn from the request's generator, after the views, in the order ``server/lowrank.py``
  draws it (blocks ascending, q before v), so predictions can match; TTL draws one A per process from
  the global RNG and resets every image to it.
- ZERO's last-resort tie break (no later view picks a tied class) is what the published
  ``break_sample_tie`` means to do, the first later view's logits restricted to the tied classes; the
  published line indexes with ``~`` on an int tensor, a bitwise NOT.
- Every method uses the one prompt ``"a photo of a {label}."``: TPT's prompts, ZERO's and TTL's
  default. TPS's headline prototypes average 80 templates and GPT-4 descriptors; with one template
  they are the class features ours gets from ``templates=["a photo of a {}."]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from adapters.views import make_views
from server.engine.adaptation import image_seed

PROMPT = "a photo of a {}."
TTL_MAX_ENTROPY = math.log(1000)  # DeYO's filter in TTL: ln(1000), hard-coded for ImageNet


@dataclass
class ReferenceResult:
    """One image through a reference: the base view's final logits and what the loop did."""

    logits: torch.Tensor  # [C] float32 (ZERO: the mean logits of the kept views)
    prediction: int  # the published prediction: argmax of the logits, or ZERO's vote winner
    steps: int = 0
    selected_views: int = 1
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # the adapted parameters, detached
    extra: dict[str, Any] = field(default_factory=dict)  # ZERO: votes and whether they tied


# -- shared pieces, as the TPT lineage writes them ---------------------------------------------------
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row softmax entropy, TPT's and DeYO's form: [N, C] -> [N]."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def avg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """TPT's ``avg_entropy``, the entropy of the views' mean softmax: [N, C] -> [].

    Written plainly (mean of the probabilities, then p log p with 0 log 0 = 0). TPT averages in log
    space, which gives the same value up to rounding.
    """
    avg = logits.softmax(-1).mean(0)  # [C]
    return -torch.special.xlogy(avg, avg).sum()


def confident_views(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """TPT's ``select_confident_samples``: indices of the lowest-entropy ``int(N * fraction)`` views (>= 1)."""
    keep = max(1, int(logits.shape[0] * fraction))
    return torch.argsort(entropy(logits), stable=True)[:keep]  # [K]


def atfd(text: torch.Tensor) -> torch.Tensor:
    """C-TPT's average text feature dispersion: mean L2 distance of unit class features to their centroid."""
    centroid = text.mean(0, keepdim=True)  # [1, D]
    return (text - centroid).norm(dim=-1).mean()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def logit_scale(model: torch.nn.Module) -> float:
    """exp of the learned temperature, in float32 (a bf16 exp would be 0.4% off)."""
    return float(model.logit_scale.detach().float().exp())


def encode_images(model: Any, images: torch.Tensor) -> torch.Tensor:
    """The whole image encoder, no grad: [N, 3, H, W] -> [N, D] unit-norm float32."""
    dtype = next(model.visual.parameters()).dtype
    with torch.no_grad():
        return F.normalize(model.encode_image(images.to(_device(model), dtype)).float(), dim=-1)


def encode_labels(model: Any, tokenizer: Any, labels: Sequence[str], template: str = PROMPT) -> torch.Tensor:
    """The class prompts through the whole text encoder at the full context, no grad: [C, D] unit-norm float32."""
    tokens = tokenizer([template.replace("{}", label) for label in labels]).to(_device(model))  # [C, 77]
    with torch.no_grad():
        return F.normalize(model.encode_text(tokens).float(), dim=-1)


def request_views(
    backbone: Any, original: torch.Tensor, base_view: torch.Tensor, n_views: int, seed: int, index: int = 0
) -> tuple[torch.Tensor, torch.Generator]:
    """The views the server makes for image ``index`` of a request with ``seed``, as
    ``server.engine.adaptation.adapt_image`` does.

    Args:
        backbone: server.clip.Backbone (its preprocessing config and device).
        original: [3, H0, W0] uint8, the decoded image.
        base_view: [3, h, w] ``backbone.preprocess`` of it.
    Returns:
        the views [n_views, 3, h, w] (row 0 the base view) and the generator, whose next draws are the
        method's (TTL's A).
    """
    generator = torch.Generator().manual_seed(image_seed(seed, index))
    cfg = backbone.preprocess_cfg
    views = make_views(
        original.to(backbone.device), n_views, backbone.image_size, cfg.mean, cfg.std, generator, base_view=base_view
    )  # [V, 3, h, w]
    return views, generator


# -- TPT and C-TPT ---------------------------------------------------------------------------------
class PromptLearner:
    """TPT's PromptLearner and TextEncoder for open_clip's CLIP: [SOT] + ctx + "{label}." + [EOT], full context.

    The token embeddings of the prompts are built once per label set, as TPT builds them when it sets
    the class names; ``reset`` restores the context to its "a photo of a" initialisation for each image.
    """

    def __init__(self, model: Any, tokenizer: Any, labels: Sequence[str], ctx_init: str = "a photo of a"):
        self.model = model
        device = _device(model)
        self.dtype = model.transformer.get_cast_dtype()
        self.tokens = tokenizer([f"{ctx_init} {label}." for label in labels]).to(device)  # [C, 77]
        n_ctx = len(tokenizer.encode(ctx_init))
        with torch.no_grad():
            emb = model.token_embedding(self.tokens).to(self.dtype)  # [C, 77, W]
        self.prefix = emb[:, :1]  # [C, 1, W] SOT
        self.suffix = emb[:, 1 + n_ctx :]  # [C, 77-1-n_ctx, W] the label, ".", EOT, padding
        self.ctx_init_state = emb[0, 1 : 1 + n_ctx].float().clone()  # [n_ctx, W]
        self.ctx = self.reset()

    def reset(self) -> torch.Tensor:
        """A fresh trainable context at its initialisation (TPT's ``model.reset()``)."""
        self.ctx = self.ctx_init_state.clone().requires_grad_(True)  # [n_ctx, W]
        return self.ctx

    def text_features(self) -> torch.Tensor:
        """[C, D] unit-norm float32 class features with the current context; differentiable in it."""
        m, c = self.model, self.tokens.shape[0]
        ctx = self.ctx.to(self.dtype)[None].expand(c, -1, -1)  # [C, n_ctx, W]
        x = torch.cat([self.prefix, ctx, self.suffix], dim=1) + m.positional_embedding.to(self.dtype)  # [C, 77, W]
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))  # batch-first in open_clip 3.3.0
        x = x[torch.arange(c, device=x.device), self.tokens.argmax(-1)]  # [C, W] at EOT
        proj = m.text_projection
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj  # [C, D]
        return F.normalize(x.float(), dim=-1)


def tpt(
    learner: PromptLearner,
    views: torch.Tensor,
    steps: int = 1,
    lr: float = 5e-3,
    selection: float = 0.1,
    dispersion_weight: float = 0.0,
) -> ReferenceResult:
    """TPT's ``test_time_tuning`` then ``inference`` for one image; C-TPT with ``dispersion_weight`` > 0.

    Args:
        learner: the label set's prompt learner; its context is reset here.
        views: [V, 3, h, w], row 0 the base view.
    """
    model = learner.model
    scale = logit_scale(model)
    ctx = learner.reset()
    optimizer = torch.optim.AdamW([ctx], lr=lr, weight_decay=0.01)
    selected: torch.Tensor | None = None
    for _ in range(steps):
        img = encode_images(model, views)  # [V, D], re-encoded every step
        with torch.enable_grad():
            text = learner.text_features()  # [C, D]
            logits = scale * img @ text.T  # [V, C]
            if selected is None:  # chosen on the first step and kept
                selected = confident_views(logits.detach(), selection)
            loss = avg_entropy(logits[selected])
            if dispersion_weight:
                loss = loss - dispersion_weight * atfd(text)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = scale * encode_images(model, views[:1])[0] @ learner.text_features().T  # [C]
    return ReferenceResult(
        final, int(final.argmax()), steps, len(selected) if selected is not None else 1, {"ctx": ctx.detach().clone()}
    )


# -- TPS --------------------------------------------------------------------------------------------
def tps(
    model: Any, prototypes: torch.Tensor, views: torch.Tensor, steps: int = 1, lr: float = 5e-3, selection: float = 0.1
) -> ReferenceResult:
    """TPS's per-image loop: a zero-initialised per-class shift of the prototypes, views re-selected every step.

    Args:
        prototypes: [C, D] unit-norm class features, computed once per label set (``encode_labels``).
        views: [V, 3, h, w], row 0 the base view.
    """
    scale = logit_scale(model)
    shift = torch.zeros_like(prototypes, requires_grad=True)  # [C, D]
    optimizer = torch.optim.AdamW([shift], lr=lr, weight_decay=0.01)
    selected = 1
    for _ in range(steps):
        img = encode_images(model, views)  # [V, D], re-encoded every step
        with torch.enable_grad():
            logits = scale * img @ F.normalize(prototypes + shift, dim=-1).T  # [V, C]
            idx = confident_views(logits.detach(), selection)
            selected = len(idx)
            loss = avg_entropy(logits[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = scale * encode_images(model, views[:1])[0] @ F.normalize(prototypes + shift, dim=-1).T  # [C]
    return ReferenceResult(final, int(final.argmax()), steps, selected, {"shift": shift.detach().clone()})


# -- TTL --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSite:
    """One LoRA-adapted projection: rows [start, stop) of the weight ``name`` of the vision tower."""

    name: str
    start: int
    stop: int
    in_features: int


def lora_sites(visual: Any, blocks: int = 3) -> list[LoraSite]:
    """TTL's LoRA sites in site order: q then v of the last ``blocks`` resblocks (rows of the packed
    ``attn.in_proj_weight``), or of a ModifiedResNet's attention pool."""
    if hasattr(visual, "attnpool"):
        pool = visual.attnpool
        return [
            LoraSite(f"attnpool.{p}_proj.weight", 0, w.shape[0], w.shape[1])
            for p, w in (("q", pool.q_proj.weight), ("v", pool.v_proj.weight))
        ]
    resblocks = visual.transformer.resblocks
    sites = []
    for i in range(max(0, len(resblocks) - blocks), len(resblocks)):
        width = resblocks[i].attn.embed_dim
        name = f"transformer.resblocks.{i}.attn.in_proj_weight"  # [3W, W]: q, k, v rows
        sites += [LoraSite(name, 0, width, width), LoraSite(name, 2 * width, 3 * width, width)]
    return sites


def ttl(
    model: Any,
    tokenizer: Any,
    labels: Sequence[str],
    views: torch.Tensor,
    generator: torch.Generator,
    steps: int = 1,
    lr: float = 5e-3,
    rank: int = 16,
    alpha: float = 32.0,
    blocks: int = 3,
    tau: float = 0.4,
) -> ReferenceResult:
    """TTL's per-image loop: LoRA on q and v of the last vision blocks, DeYO's weighted entropy over all views.

    Args:
        views: [V, 3, h, w], row 0 the base view.
        generator: draws A (xavier-normal, [r, in] per site, in site order); B starts at zero.
    """
    visual = model.visual
    device = _device(model)
    frozen = dict(visual.named_parameters())
    sites = lora_sites(visual, blocks)
    a, b = [], []
    for site in sites:
        draw = torch.empty(rank, site.in_features, device=generator.device)  # [r, in]
        torch.nn.init.xavier_normal_(draw, generator=generator)
        a.append(draw.to(device).requires_grad_(True))
        b.append(torch.zeros(site.stop - site.start, rank, device=device, requires_grad=True))  # [out, r]
    optimizer = torch.optim.AdamW([t for pair in zip(a, b, strict=True) for t in pair], lr=lr, weight_decay=0.01)
    scaling = alpha / rank
    scale = logit_scale(model)

    def merged() -> dict[str, torch.Tensor]:
        """The adapted weights, W + (alpha / r) B A on each site's rows; differentiable in A and B."""
        out: dict[str, torch.Tensor] = {}
        for site, a_i, b_i in zip(sites, a, b, strict=True):
            weight = out.get(site.name, frozen[site.name])
            delta = (scaling * b_i @ a_i).to(weight.dtype)  # [out, in]
            rows = weight.shape[0]
            out[site.name] = weight + F.pad(delta, (0, 0, site.start, rows - site.stop))  # [rows, in]
        return out

    def image_features(x: torch.Tensor) -> torch.Tensor:
        """The whole vision tower with the merged weights: [N, 3, H, W] -> [N, D] unit-norm float32."""
        x = x.to(device, next(visual.parameters()).dtype)
        return F.normalize(torch.func.functional_call(visual, merged(), (x,)).float(), dim=-1)

    taken, kept = 0, views.shape[0]
    for _ in range(steps):
        with torch.enable_grad():
            img = image_features(views)  # [V, D], every view through the whole tower
            text = encode_labels(model, tokenizer, labels)  # [C, D], re-encoded every forward, no grad
            h = entropy(scale * img @ text.T)  # [V]
            passing = h <= TTL_MAX_ENTROPY
            kept = int(passing.sum())
            if kept == 0:  # DeYO skips the step
                continue
            h = h[passing]
            loss = (h * (1.0 / torch.exp(h.detach() - tau))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        taken += 1
    with torch.no_grad():
        final = scale * image_features(views[:1])[0] @ encode_labels(model, tokenizer, labels).T  # [C]
    state = {f"a{i}": t.detach().clone() for i, t in enumerate(a)} | {
        f"b{i}": t.detach().clone() for i, t in enumerate(b)
    }
    return ReferenceResult(final, int(final.argmax()), taken, kept, state)


# -- ZERO -------------------------------------------------------------------------------------------
def zero(model: Any, text: torch.Tensor, views: torch.Tensor, gamma: float = 0.3) -> ReferenceResult:
    """ZERO for one image: the views in one batch, then ``vote``.

    Args:
        text: [C, D] unit-norm class features, computed once per label set.
        views: [V, 3, h, w], row 0 the base view.
    """
    logits = logit_scale(model) * encode_images(model, views) @ text.T  # [V, C]
    return vote(logits, gamma)


def vote(logits: torch.Tensor, gamma: float = 0.3) -> ReferenceResult:
    """ZERO's ``zero``: the ``int(V * gamma)`` most confident views vote with their argmax; ties broken greedily.

    The published tie break (``greedy_break(ties, l[k:])``) walks the views after the first
    ``k = int(V * gamma)`` in view order, not in order of confidence, and takes the first whose argmax
    is a tied class.

    Args:
        logits: [V, C] the views' logits, row 0 the base view.
    Returns:
        the vote winner as the prediction; logits are the kept views' mean, for comparing with ours.
    """
    n, c = logits.shape
    k = max(1, int(n * gamma))
    kept = torch.argsort(entropy(logits), stable=True)[:k]  # [K]
    votes = torch.bincount(logits[kept].argmax(-1), minlength=c)  # [C]
    winner = int(votes.argmax())
    tied = (votes == votes[winner]).nonzero().flatten().tolist()
    if len(tied) > 1:
        later = logits[k:]  # [V-k, C] in view order, as published
        picks = [p for p in later.argmax(-1).tolist() if p in tied]
        if picks:
            winner = picks[0]
        else:
            row = later[0] if len(later) else logits[kept].mean(0)  # [C]
            winner = tied[int(row[tied].argmax())]
    return ReferenceResult(logits[kept].mean(0), winner, 0, k, extra={"votes": int(votes.max()), "tied": len(tied) > 1})
