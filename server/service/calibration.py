"""Calibrated confidence: a temperature per method, fitted on labelled data, applied to every answer.

Temperature scaling (Guo et al., 2017): one scalar T per (model, method) that minimises the negative
log-likelihood of softmax(logits / T) on labelled images; it changes confidence, never the label.
Temperatures come from the model card (``ttaserve.json``); a method without one gets T = 1. The one
fit (``fit_temperature``) is what ``benchmarks/assets/calibrate.py`` writes into the card.
"""

from __future__ import annotations

import math

import torch

from server.clip.card import ModelCard
from server.service.results import Prediction

LOG_T_RANGE = (math.log(0.05), math.log(20.0))


class Calibration:
    """The temperatures of one model's methods."""

    def __init__(self, temperatures: dict[str, float] | None = None):
        self._temperatures = dict(temperatures or {})

    @classmethod
    def from_card(cls, card: ModelCard) -> Calibration:
        return cls({method: entry.temperature for method, entry in card.calibration.items()})

    def temperature(self, method: str) -> float:
        return self._temperatures.get(method, 1.0)

    def fitted(self, method: str) -> bool:
        return method in self._temperatures


def predictions(
    logits: torch.Tensor, temperature: float, labels: tuple[str, ...], order: torch.Tensor | None, top_k: int
) -> list[Prediction]:
    """[C] logits -> the ``top_k`` predictions, ranked by ``order`` (ZERO's vote) or by probability, with the
    calibrated probability softmax(logits / T) beside the raw one."""
    raw = logits.softmax(-1)  # [C]
    calibrated = (logits / temperature).softmax(-1)  # [C]
    ranked = order if order is not None else torch.argsort(calibrated, descending=True, stable=True)
    return [
        Prediction(
            label=labels[j], probability=float(calibrated[j]), raw_probability=float(raw[j]), logit=float(logits[j])
        )
        for j in ranked[:top_k].tolist()
    ]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [0.05, 20] minimising the NLL of softmax(logits / T): a grid, then golden-section refinement.

    Args:
        logits: [N, C] a method's final logits on labelled images.
        labels: [N] the true class indices.
    """

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels))

    grid = torch.linspace(*LOG_T_RANGE, 121).tolist()
    best = min(range(len(grid)), key=lambda i: nll(grid[i]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)
