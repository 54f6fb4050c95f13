"""Pieces the test-time methods share: view options, and a fresh optimizer over one or many stacked images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from adapters.base import MethodOptions, Stopped
from adapters.ensemble import NO_ENSEMBLE, EnsembleOptions
from adapters.regularizers import NO_REGULARIZERS, RegularizerOptions

MAX_VIEWS = 1024  # a sanity bound; the server's TTA_MAX_VIEWS is the operational one
MAX_STEPS = 100
# How augmented views are made (adapters.views): TPT's random resized crops with flips, or those mixed by AugMix.
Augmentation = Literal["crop_flip", "augmix"]


def check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")


@dataclass(frozen=True)
class EpisodicOptions(MethodOptions):
    """TPT's defaults, shared by the gradient methods: 64 views, 10% most confident, 1 AdamW step at 5e-3."""

    views: int = 64
    selection: float = 0.1
    steps: int = 1
    lr: float = 5e-3
    augmentation: Augmentation = "crop_flip"
    ensemble: EnsembleOptions = NO_ENSEMBLE
    regularizers: RegularizerOptions = NO_REGULARIZERS

    def __post_init__(self) -> None:
        check_range("views", self.views, 1, MAX_VIEWS)
        check_range("selection", self.selection, 1e-6, 1.0)
        check_range("steps", self.steps, 0, MAX_STEPS)
        check_range("lr", self.lr, 0.0, 10.0)


def optimize(
    params: Sequence[Sequence[torch.Tensor]],
    lr: float,
    steps: int,
    loss_fn: Callable[[int], Sequence[torch.Tensor | None]],
    stop: Callable[[], bool] = lambda: False,
    anchor: Sequence[Sequence[torch.Tensor]] | None = None,
    anchor_weight: float | Callable[[int], float] = 0.0,
) -> list[int]:
    """Run ``steps`` AdamW steps for R stacked images at once, each as if it were alone.

    TPT's optimizer: torch's AdamW defaults (weight decay 0.01), fresh per request. ``params[r]`` are
    image r's own leaf tensors; ``loss_fn(step)`` returns one loss per image, or None for an image
    that skips the step (no view passed a filter). The losses are summed, so each image's gradient
    is exactly its own loss's; AdamW is elementwise and keeps state per tensor, so one optimizer over
    all images' leaves takes for each the step a separate optimizer would. An image that skips has
    its gradients cleared, which AdamW treats as no step at all (no weight decay either).

    ``anchor`` (image r's start values, one per leaf) with ``anchor_weight`` w > 0 (a number, or image
    r -> its weight) pulls the parameters toward their start: the proximal step of w * ||p - p0||^2
    after the AdamW step, taken in the metric AdamW steps in. AdamW moves each element by
    lr * m / (sqrt(v) + eps) (v: its bias-corrected second moment), a gradient step with the
    elementwise step size lr / (sqrt(v) + eps); the proximal step with that step size is
    p <- p0 + (p - p0) / (1 + 2 * lr * w / (sqrt(v) + eps)), the exact minimiser of
    w * ||x - p0||^2 + sum (x - p)^2 (sqrt(v) + eps) / (2 lr). So w weighs the pull against the method's
    own gradients, as a loss term's weight would under plain gradient descent, and the pull grows with
    w without ever overshooting p0. As a loss term its gradient went through Adam's normalisation,
    which moves each element by about lr whatever the weight, so a heavier weight could not shorten
    the step; with the plain step size lr (Euclidean), the pull was negligible until 2 * lr * w
    neared 1 (benchmarks/RESULTS.md, anchor regularizers). It acts from an image's second step on:
    after one step it changes nothing, as a term that is 0 with a zero gradient at p0 (where the
    parameters start) would not.

    ``stop()`` is checked before each step; when it says so, ``Stopped`` is raised. The optimizer
    state lives and dies here. Returns the steps each image took.
    """
    taken = [0] * len(params)
    if steps == 0:
        return taken
    optimizer = torch.optim.AdamW([p for group in params for p in group], lr=lr, weight_decay=0.01)
    with torch.enable_grad():
        for step in range(steps):
            if stop():
                raise Stopped(f"stopped before step {step + 1} of {steps}")
            losses = loss_fn(step)
            live = [loss for loss in losses if loss is not None]
            if not live:
                continue
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(torch.stack(live).sum())
            for r, loss in enumerate(losses):
                if loss is None:
                    for p in params[r]:
                        p.grad = None
                else:
                    taken[r] += 1
            optimizer.step()
            if anchor is not None:
                pull(optimizer, params, anchor, anchor_weight, losses, taken, lr)
    return taken


def pull(
    optimizer: torch.optim.AdamW,
    params: Sequence[Sequence[torch.Tensor]],
    anchor: Sequence[Sequence[torch.Tensor]],
    anchor_weight: float | Callable[[int], float],
    losses: Sequence[torch.Tensor | None],
    taken: Sequence[int],
    lr: float,
) -> None:
    """``optimize``'s proximal step toward the start, in AdamW's metric, for each image past its first step."""
    _, beta2 = optimizer.defaults["betas"]
    eps = optimizer.defaults["eps"]
    with torch.no_grad():
        for r, loss in enumerate(losses):
            weight = anchor_weight(r) if callable(anchor_weight) else anchor_weight
            if loss is None or taken[r] < 2 or weight <= 0:
                continue
            for p, p0 in zip(params[r], anchor[r], strict=True):
                state = optimizer.state[p]
                v = state["exp_avg_sq"] / (1.0 - beta2 ** float(state["step"]))  # bias-corrected, as AdamW's step
                p.copy_(p0 + (p - p0) / (1.0 + 2.0 * lr * weight / (v.sqrt() + eps)))
