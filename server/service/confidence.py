"""Label-free confidence: how likely an answer is to be right, read off the prediction itself.

A CLIP model's softmax is over-confident under shift: on the demo model's corruptions it says about
80% where it is right 50-70% of the time, and a temperature fitted on clean images makes that worse
(the model is under-confident on clean ones). ``ConfidenceModel`` is a logistic model of
P(the top label is right) on three features of the zero-shot prediction at the model's own scale:
the log-odds of its top probability, its entropy over log C, and its top-1 minus top-2 margin. It is
fitted on labelled images that include shifted ones, so it learns how confidence and correctness
part ways under shift, and it needs no label at serving time.

The shipped default (``label_free_confidence.json``) was fitted by ``benchmarks/assets/fit_confidence.py``
on the demo model's validation split, clean and with three of the five shift families (noise,
weather, style); the other families (blur, digital), held-out compositions, a second seed and a
second model are what ``benchmarks/calibration_shift.py`` reports on. Signals that need augmented
views (how much the views agree, their mutual information) and request context (the other images of
a request) were tried on the same protocol and left out: they did not help on held-out families and
made the transfer to a second model worse (benchmarks/RESULTS.md, "Confidence under shift").

A confidence becomes probabilities by a per-image temperature: the one at which the softmax of the
image's logits gives its top label exactly that confidence. The order of the labels never changes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FEATURES = ("log_odds", "entropy", "margin")
DEFAULT_FILE = Path(__file__).with_name("label_free_confidence.json")
_EPS = 1e-6
_LOG_T = (math.log(1e-3), math.log(1e6))  # the temperatures a confidence may ask for
_FLOOR = 1e-4  # the least a top probability exceeds 1/C by


def features(logits: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
    """[N, C] logits -> [N, 3] features of each row's prediction of label ``top`` (default: its argmax).

    log-odds of the label's probability, entropy of the softmax over log C, and the label's
    probability minus the largest other one (negative when the label is not the argmax).
    """
    probs = logits.float().softmax(-1)  # [N, C]
    n, c = probs.shape
    top = probs.argmax(-1) if top is None else top
    p = probs.gather(1, top[:, None]).squeeze(1).clamp(_EPS, 1 - _EPS)  # [N]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(c) if c > 1 else torch.zeros(n)
    others = probs.scatter(1, top[:, None], -1.0)  # the label itself out of the running
    margin = p - others.max(-1).values if c > 1 else torch.ones(n)
    return torch.stack([(p / (1 - p)).log(), entropy, margin], dim=1)  # [N, 3]


@dataclass(frozen=True)
class ConfidenceModel:
    """P(right | features): sigmoid(intercept + sum_k weight_k * (feature_k - mean_k) / scale_k)."""

    intercept: float
    weights: tuple[float, ...]
    means: tuple[float, ...]
    scales: tuple[float, ...]
    images: int  # labelled images it was fitted on
    data: str  # what they were

    def predict(self, logits: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
        """[N, C] logits -> [N] the probability that label ``top`` (default: the argmax) is right."""
        x = (features(logits, top) - torch.tensor(self.means)) / torch.tensor(self.scales)  # [N, 3]
        return torch.sigmoid(x @ torch.tensor(self.weights) + self.intercept)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, C] logits -> [N, C] each label's own probability of being right, as if it were the answer.

        They need not sum to 1: two labels can both be likely (a synonym), or none (an image of no
        label's kind). The top label's score is its confidence.
        """
        n, c = logits.shape
        labels = torch.arange(c).repeat(n)  # [N*C]
        return self.predict(logits.repeat_interleave(c, dim=0), labels).view(n, c)

    @classmethod
    def fit(
        cls,
        logits: torch.Tensor,
        labels: torch.Tensor,
        data: str,
        answers: torch.Tensor | None = None,
        prior: ConfidenceModel | None = None,
        strength: float = 1e-3,
    ) -> ConfidenceModel:
        """Fit on labelled images.

        Args:
            logits: [N, C] each image's zero-shot logits (what confidence reads at serving time).
            labels: [N] the true classes.
            answers: [N] the labels a method answered (default: the zero-shot argmax).
            prior: a model to start from and stay near: its standardisation is kept and its weights are
                the centre of the L2 penalty (the intercept is free). For a few hundred images of one
                label set, whose features span a narrow range: the fit moves the level of confidence
                and keeps the shape learnt on many.
            strength: the L2 penalty on the weights (towards the prior's, or towards 0).
        """
        answers = logits.argmax(-1) if answers is None else answers
        x = features(logits, answers)  # [N, 3]
        right = (answers == labels).float()  # [N]
        if prior is None:
            means, scales = x.mean(0), x.std(0).clamp_min(1e-6)
            centre = torch.zeros(x.shape[1])
            start = torch.zeros(x.shape[1] + 1)
        else:
            means, scales = torch.tensor(prior.means), torch.tensor(prior.scales)
            centre = torch.tensor(prior.weights)
            start = torch.tensor([prior.intercept, *prior.weights])
        z = (x - means) / scales
        w = start.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

        def loss() -> torch.Tensor:
            optimizer.zero_grad()
            value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w[1:] + w[0], right)
            value = value + strength * ((w[1:] - centre) ** 2).sum()
            torch.autograd.backward(value)
            return value

        with torch.enable_grad():
            optimizer.step(loss)  # type: ignore[no-untyped-call]  # torch's LBFGS.step is unannotated
        fitted = w.detach()
        return cls(
            float(fitted[0]),
            tuple(fitted[1:].tolist()),
            tuple(means.tolist()),
            tuple(scales.tolist()),
            len(labels),
            data,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, not tuples), as a model card or the default file holds it."""
        return {"features": list(FEATURES)} | {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfidenceModel:
        if list(data.get("features", FEATURES)) != list(FEATURES):
            raise ValueError(f"a confidence model over {data.get('features')}, not {list(FEATURES)}")
        return cls(
            float(data["intercept"]),
            tuple(map(float, data["weights"])),
            tuple(map(float, data["means"])),
            tuple(map(float, data["scales"])),
            int(data["images"]),
            str(data["data"]),
        )

    @classmethod
    def default(cls) -> ConfidenceModel:
        """The shipped label-free model (see the module docstring for how it was fitted)."""
        return cls.from_dict(json.loads(DEFAULT_FILE.read_text()))


def temper(logits: torch.Tensor, confidence: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
    """[N, C] logits and [N] confidences -> [N, C] probabilities whose label ``top`` (default: the argmax)
    gets its confidence, by a temperature per row: softmax(logits / T).

    The order of the labels is the logits' own: a temperature never reorders them. A confidence
    below 1/C gives a distribution a hair above uniform, in the same order. A ``top`` that is
    not the argmax (ZERO's vote) is first raised to the argmax's logit, so that it leads.
    """
    logits = logits.float()
    n, c = logits.shape
    if c == 1:
        return torch.ones(n, 1)
    top = logits.argmax(-1) if top is None else top
    lifted = logits.scatter(1, top[:, None], logits.max(-1, keepdim=True).values)  # the label leads
    target = confidence.clamp(1.0 / c + _FLOOR, 1 - _EPS)  # [N] a hair above uniform: the order stays visible
    lo = torch.full((n,), _LOG_T[0])  # small T: sharp, top probability near 1 (or 1/ties)
    hi = torch.full((n,), _LOG_T[1])  # large T: flat, top probability near 1/C
    for _ in range(60):  # the top probability falls as T rises: bisect on log T
        mid = (lo + hi) / 2
        p = (lifted / mid.exp()[:, None]).softmax(-1).gather(1, top[:, None]).squeeze(1)
        too_sharp = p > target
        lo = torch.where(too_sharp, mid, lo)
        hi = torch.where(too_sharp, hi, mid)
    return (lifted / ((lo + hi) / 2).exp()[:, None]).softmax(-1)
