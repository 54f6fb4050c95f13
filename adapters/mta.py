"""MTA: MeanShift for Test-time Augmentation (Zanella and Ben Ayed, CVPR 2024, https://arxiv.org/abs/2405.02266).

No training: the image's embedding is re-estimated as the mode of its augmented views' embeddings,
found by a MeanShift whose per-view inlierness scores y are optimised jointly: views far from the
mode, or whose predictions disagree with the others', weigh less. Inlierness: y = softmax((density
+ lambda_q * A y) / lambda_y) with A the views' prediction affinity; mode: the density- and
inlierness-weighted mean of the views, renormalised. The prediction is the mode against the classes.

How ours differs from the official code (MaxZanella/MTA): the model's logit scale is used where the
code hard-codes 100; class features are the request's template ensemble (MTA uses "a photo of a",
which is our ``simple`` template); view features are encoded once. Views: MTA uses random resized
crops with flips (its script turns AugMix on only for TPT's runs), our default ``augmentation``.
An addition of ours, off by default: the ensemble with zero-shot (adapters/ensemble.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapters.base import AdaptInput, AdaptResult, Method, MethodOptions, register
from adapters.common import MAX_VIEWS, Augmentation, check_range
from adapters.ensemble import NO_ENSEMBLE, EnsembleOptions

TOLERANCE = 1e-6


def bandwidths(feats: torch.Tensor, neighbours: float = 0.3) -> torch.Tensor:
    """[V, D] -> [V] per-view kernel bandwidth: sqrt(0.5 * mean squared distance to its k nearest views)."""
    v = feats.shape[0]
    k = max(1, int(neighbours * (v - 1)))
    d2 = torch.cdist(feats, feats).pow(2)  # [V, V]
    d2.fill_diagonal_(float("inf"))
    nearest = d2.topk(min(k, v - 1), largest=False).values if v > 1 else torch.ones(1, 1)
    return (0.5 * nearest.mean(-1)).sqrt().clamp_min(1e-8)  # [V]


def mean_shift(
    feats: torch.Tensor, probs: torch.Tensor, lambda_y: float, lambda_q: float, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Joint mode and inlierness estimation: returns (mode [D], inlierness [V], outer iterations run)."""
    v = feats.shape[0]
    h = bandwidths(feats)  # [V]
    affinity = probs @ probs.T  # [V, V]
    y = torch.full((v,), 1.0 / v)  # [V]
    mode = feats[0]  # [D] starts at the base view
    runs = 0
    for _ in range(iterations):
        runs += 1
        density = torch.exp(-(feats - mode).pow(2).sum(-1) / (2 * h**2))  # [V]
        for _ in range(5):  # inlierness step
            y_new = torch.softmax((density + lambda_q * affinity @ y) / lambda_y, dim=0)
            converged = torch.linalg.norm(y_new - y) < TOLERANCE
            y = y_new
            if converged:
                break
        previous = mode
        for _ in range(5):  # mode step
            density = torch.exp(-(feats - mode).pow(2).sum(-1) / (2 * h**2))  # [V]
            weights = density * y  # [V]
            new = F.normalize((weights[:, None] * feats).sum(0) / weights.sum().clamp_min(1e-12), dim=-1)
            converged = torch.linalg.norm(new - mode) < TOLERANCE
            mode = new
            if converged:
                break
        if torch.linalg.norm(mode - previous) < TOLERANCE:
            break
    return mode, y, runs


@dataclass(frozen=True)
class MTAOptions(MethodOptions):
    views: int = 64
    lambda_y: float = 0.2
    lambda_q: float = 4.0
    iterations: int = 5
    augmentation: Augmentation = "crop_flip"
    ensemble: EnsembleOptions = NO_ENSEMBLE

    def __post_init__(self) -> None:
        check_range("views", self.views, 1, MAX_VIEWS)
        check_range("lambda_y", self.lambda_y, 1e-6, 1e3)
        check_range("lambda_q", self.lambda_q, 0.0, 1e3)
        check_range("iterations", self.iterations, 0, 100)


@register
class MTA(Method[MTAOptions]):
    name = "mta"
    summary = "MeanShift over augmented-view embeddings with inlierness scores; no training."
    Options = MTAOptions

    def adapt(self, inp: AdaptInput, options: MTAOptions) -> AdaptResult:
        feats = inp.view_features.float()  # [V, D]
        probs = inp.zero_shot_logits().softmax(-1)  # [V, C]
        mode, y, runs = mean_shift(feats, probs, options.lambda_y, options.lambda_q, options.iterations)
        logits = inp.logit_scale * mode @ inp.class_features.T  # [C]
        inliers = int((y > 1.0 / len(y)).sum())
        return AdaptResult(logits, steps=runs, selected_views=inliers, extra={"inlier_views": inliers})
