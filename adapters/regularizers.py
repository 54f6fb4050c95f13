"""Anchor regularizers for test-time adaptation, after ARF, and L2-SP.

ARF (Han et al., CVPR 2024, https://arxiv.org/abs/2404.06244; no public code) finetunes CLIP with
extra contrastive pairs (finetune images with generated captions, retrieved images with their web
captions) so that the feature space keeps its alignment with rich text. At test time there is no
captioner and no retrieval set, so we keep the idea, "do not drift from the frozen model's
semantics", in three cheap terms:

- ``feature``: 1 - cos between the adapted and the frozen features, averaged. For a method that
  adapts the vision tower (TTL) these are the image features of the views; for one that adapts
  the class side (TPT and C-TPT's prompt context, TPS's prototype shifts) the class features.
- ``anchor_kl``: KL(frozen || adapted) between the softmax distributions of each view over a bank of
  anchor texts (generic captions shipped in ``adapters/anchors.json``, plus the request's label set's
  descriptions), at the model's logit scale: ARF's "rich semantics" as a distribution to keep. Only
  for methods that change the image features (TTL); the class side does not move the anchors.
- ``l2sp``: the squared L2 distance of the adapted parameters from where they started (L2-SP, Li et
  al., ICML 2018), summed over the parameter tensors.

``l2sp``, ``anchor_kl``, and ``feature`` on TTL and TPS are not loss terms (``feature`` on TPT and C-TPT
is; see below): the optimizer (``adapters.common.optimize``) takes their proximal step toward the
start after each AdamW step, in the metric AdamW steps in,
p <- p0 + (p - p0) / (1 + 2 * lr * w / (sqrt(v) + eps)) (v: Adam's second moment of the method's
gradient), decoupled as AdamW decouples weight decay. ``feature`` and ``anchor_kl`` have no closed-form
proximal step, so it is taken for the isotropic quadratic that equals the divergence where the step's
loss was evaluated: weight w * divergence / ||p - p0||^2 (``divergence_curvature``), so the pull is
strong only where the displacement has moved the features (``feature``: their 1 - cos to the frozen
ones, the value the term always had) or the anchor distribution (``anchor_kl``). As loss terms, their
gradients went through Adam's normalisation, which moves each parameter by about lr whatever the
weight: a heavier weight turned the step but did not shorten it, so the drift stopped falling past
weight 1-10, and ``feature`` at small weights raised it (benchmarks/RESULTS.md, anchor regularizers).
As pulls, the drift of the features falls as the weight grows (measured at 5 steps and a high
learning rate: RESULTS.md, "Anchor regularizers, fourth"). On TPT's prompt context the ``feature``
pull raised the drift at weights 0.01-1 (the context moves far outside the embedding scale, where
shrinking its displacement does not shrink the features' drift), while the loss term lowered it from
0.1, so there ``feature`` stays a loss term.

All three are 0 with a zero gradient at the start (the adapted model is the frozen one there, a
minimum of each), so with one step (the default of every method) they change nothing: they act from
the second step on, which is where a high learning rate or many steps make a method drift. (The
pulls likewise start after an image's second step, so one step is unchanged too.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import ConfigDict

ANCHOR_FILE = Path(__file__).with_name("anchors.json")
KINDS = ("feature", "anchor_kl", "l2sp")
MAX_WEIGHT = 1e4


@dataclass(frozen=True)
class RegularizerOptions:
    """Weights of the anchor regularizers that keep adaptation near the frozen model (0: off).

    Each is 0 with a zero gradient at the start, so it acts from the second step on (steps >= 2).
    ``feature``: 1 - cos(adapted, frozen features). ``anchor_kl``: KL(frozen || adapted) over the anchor texts
    (vision-side methods). ``l2sp``: squared distance w * ||p - p0||^2 of the adapted parameters from their
    start. They are applied by the optimizer (``feature`` on TPT and C-TPT excepted: a loss term there) as a
    decoupled pull toward the start after each step from the second, in Adam's metric,
    p <- p0 + (p - p0) / (1 + 2 * lr * w' / (sqrt(v) + eps)) with w' = w for ``l2sp`` and
    w * divergence / ||p - p0||^2 for ``feature`` and ``anchor_kl`` (their value where the step was taken),
    so the distance shrinks as w grows even at a high learning rate.
    """

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")  # a misspelt key is an error

    feature: float = 0.0
    anchor_kl: float = 0.0
    l2sp: float = 0.0

    def __post_init__(self) -> None:
        for kind in KINDS:
            value = getattr(self, kind)
            if not 0.0 <= value <= MAX_WEIGHT:
                raise ValueError(f"regularizers.{kind} must be between 0 and {MAX_WEIGHT:g}, got {value:g}")

    def asked(self) -> list[str]:
        """The kinds with a weight above 0."""
        return [kind for kind in KINDS if getattr(self, kind) > 0]


NO_REGULARIZERS = RegularizerOptions()  # the default: every weight 0


@cache
def anchor_bank() -> tuple[str, ...]:
    """The shipped anchor captions (generic scenes and objects), read once."""
    data = json.loads(ANCHOR_FILE.read_text(encoding="utf-8"))
    return tuple(data["captions"])


def anchor_texts(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The shipped bank and ``extra`` (a label set's description sentences), without repeats, bank first."""
    seen = dict.fromkeys(anchor_bank())
    seen.update(dict.fromkeys(extra))
    return tuple(seen)


def feature_drift(adapted: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(adapted, frozen) over rows: [..., N, D], [N, D] -> [...]."""
    return (1.0 - F.cosine_similarity(adapted, frozen.to(adapted.dtype), dim=-1)).mean(-1)


def anchor_kl(adapted: torch.Tensor, frozen: torch.Tensor, anchors: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean over views of KL(p_frozen || p_adapted), p = softmax over anchors of scale * cos.

    Args:
        adapted: [..., V, D] unit-norm adapted image features.
        frozen: [V, D] unit-norm frozen image features of the same views.
        anchors: [M, D] unit-norm anchor text features.
        scale: the model's logit scale.
    Returns:
        [...] the divergence.
    """
    log_p = (scale * adapted @ anchors.T).log_softmax(-1)  # [..., V, M]
    log_q = (scale * frozen @ anchors.T).log_softmax(-1).to(log_p.dtype)  # [V, M]
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean(-1)


def l2sp(params: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over tensors of ||p - p0||^2: the term whose proximal step ``adapters.common.optimize`` takes."""
    return torch.stack([(p - p0).pow(2).sum() for p, p0 in zip(params, start, strict=True)]).sum()


def divergence_curvature(
    divergence: torch.Tensor, params: Sequence[torch.Tensor], start: Sequence[torch.Tensor]
) -> float:
    """divergence / ||p - p0||^2: the weight of the isotropic quadratic equal to the divergence at p (0 at the start).

    Near the start ``feature`` and ``anchor_kl`` are quadratics in p - p0 (each is 0 with a zero gradient
    there); this is the curvature along the displacement, halved, so either at weight w pulls as ``l2sp``
    at w * divergence_curvature would: hard where the displacement moves the features or the anchor
    distribution, not at all where it leaves them alone.
    """
    distance = float(l2sp([p.detach() for p in params], start))
    return float(divergence) / distance if distance > 0 else 0.0
