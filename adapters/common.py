"""Pieces the test-time methods share: view options, a fresh per-request optimizer, step loops."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MAX_VIEWS = 1024  # a sanity bound; the server's TTA_MAX_VIEWS is the operational one
MAX_STEPS = 100


def check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")


@dataclass(frozen=True)
class EpisodicOptions:
    """TPT's defaults, shared by the gradient methods: 64 views, 10% most confident, 1 AdamW step at 5e-3."""

    views: int = 64
    selection: float = 0.1
    steps: int = 1
    lr: float = 5e-3

    def __post_init__(self) -> None:
        check_range("views", self.views, 1, MAX_VIEWS)
        check_range("selection", self.selection, 1e-6, 1.0)
        check_range("steps", self.steps, 0, MAX_STEPS)
        check_range("lr", self.lr, 0.0, 10.0)


def optimize(params: list[torch.Tensor], lr: float, steps: int,
             loss_fn: Callable[[int], torch.Tensor | None]) -> int:
    """Run ``steps`` AdamW steps on ``params`` with a fresh optimizer (TPT: torch defaults, weight decay 0.01).

    ``loss_fn(step)`` returns the loss to minimise, or None to skip that step (no view passed a filter).
    The optimizer state lives and dies here, with the request. Returns the number of steps taken.
    """
    if steps == 0:
        return 0
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    taken = 0
    with torch.enable_grad():
        for step in range(steps):
            loss = loss_fn(step)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            taken += 1
    return taken
