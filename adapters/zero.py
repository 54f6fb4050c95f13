"""ZERO: test-time augmentation with zero temperature (Farina et al., NeurIPS 2024, https://arxiv.org/abs/2405.18330).

No training: encode the image and 63 augmented views, keep the 30% with the lowest entropy (gamma),
and let each vote for its arg-max class; the most voted class wins, ties broken greedily by the
next most confident views. The vote share is reported as ``agreement``: it is not a probability.

How ours differs from the official code (FarinaMatteo/zero):

- Ties are broken by the next most confident views, in entropy order, as the paper and our research
  notes describe. The official code passes ``l[k:]``, the views after the first k by position (the
  augmented views in the order they were drawn, some of them kept ones), which differs when a tie
  occurs; benchmarks/_lib/reference.py runs the published order and the latency benchmark counts those
  disagreements as ties, not errors.
- Ties that no remaining view breaks (the official fallback has a bitwise-NOT bug) go to the tied
  class with the highest mean probability over the kept views.
- ZERO returns only votes. We also return probabilities, from the mean of the kept views' logits,
  so the result can be calibrated and thresholded; the label is the vote winner, listed first,
  and the other predictions follow in order of votes, then probability.
- Views: ZERO uses random resized crops with flips only (its ``data/augs.py``), our default;
  ``augmentation: "augmix"`` is offered for comparison.
- No ``ensemble`` option: the answer is a vote, not logits to blend with zero-shot's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.base import AdaptInput, AdaptResult, Method, MethodOptions, register
from adapters.common import MAX_VIEWS, Augmentation, check_range
from adapters.losses import entropy


def vote(logits: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[V, C] view logits -> (votes [C], class order best first [C], kept view indices [K])."""
    v, c = logits.shape
    order = torch.argsort(entropy(logits), stable=True)  # [V] most confident first
    keep = max(1, int(v * gamma))
    picks = logits[order].argmax(-1)  # [V] each view's class, in confidence order
    votes = torch.bincount(picks[:keep], minlength=c)  # [C]
    mean_prob = logits[order[:keep]].softmax(-1).mean(0)  # [C]
    tied = (votes == votes.max()).nonzero().flatten()
    winner = int(tied[mean_prob[tied].argmax()])
    if len(tied) > 1:
        for pick in picks[keep:].tolist():  # greedy: the next most confident view that picks a tied class
            if pick in tied.tolist():
                winner = pick
                break
    # Rank: the winner, then by votes, then by mean probability.
    score = votes.double() * 2 + mean_prob.double()  # mean_prob < 1 never reorders different vote counts
    score[winner] = float("inf")
    return votes, torch.argsort(score, descending=True, stable=True), order[:keep]


@dataclass(frozen=True)
class ZeroOptions(MethodOptions):
    views: int = 64
    gamma: float = 0.3
    augmentation: Augmentation = "crop_flip"

    def __post_init__(self) -> None:
        check_range("views", self.views, 1, MAX_VIEWS)
        check_range("gamma", self.gamma, 1e-6, 1.0)


@register
class Zero(Method[ZeroOptions]):
    name = "zero"
    summary = "Majority vote of the most confident augmented views at zero temperature; no training."
    Options = ZeroOptions

    def adapt(self, inp: AdaptInput, options: ZeroOptions) -> AdaptResult:
        logits = inp.zero_shot_logits()  # [V, C]
        votes, order, kept = vote(logits, options.gamma)
        mean_logits = logits[kept].mean(0)  # [C]
        winner = int(order[0])
        return AdaptResult(
            mean_logits,
            steps=0,
            selected_views=len(kept),
            order=order,
            extra={"agreement": float(votes[winner]) / len(kept)},
        )
