"""Scores for a set of predictions: top-1, expected calibration error, NLL, with bootstrap intervals."""

from __future__ import annotations

import torch

ECE_BINS = 15


def nll(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N] negative log-likelihood of the true label, in nats (probabilities floored at 1e-12)."""
    return -probs.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12).log()


def ece_from(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Expected calibration error over equal-width confidence bins, for [..., N] batches of samples."""
    edges = torch.linspace(0, 1, bins + 1)
    index = torch.bucketize(confidence.clamp(1e-6, 1), edges[1:-1], right=True)  # bin of each sample
    n = confidence.shape[-1]
    total = torch.zeros(*confidence.shape[:-1], bins)
    gap = torch.zeros(*confidence.shape[:-1], bins)
    total.scatter_add_(-1, index, torch.ones_like(confidence))
    gap.scatter_add_(-1, index, confidence - correct)
    return gap.abs().sum(-1) / n


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count, for a reliability diagram."""
    edges = torch.linspace(0, 1, bins + 1)
    index = torch.bucketize(confidence.clamp(1e-6, 1), edges[1:-1], right=True)
    count = torch.bincount(index, minlength=bins).float()
    conf = torch.bincount(index, weights=confidence, minlength=bins) / count.clamp_min(1)
    acc = torch.bincount(index, weights=correct, minlength=bins) / count.clamp_min(1)
    return {"confidence": conf.tolist(), "accuracy": acc.tolist(), "count": count.tolist()}


def score(
    probs: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    pred: torch.Tensor | None = None,
) -> dict[str, float]:
    """Top-1 and ECE in percent and NLL, each with a 95% bootstrap interval; ``changed``: share of
    predictions differing from ``reference`` (the zero-shot predictions [N]), in percent.

    ``pred`` [N] is the method's label when it is not the arg-max of ``probs`` (ZERO's vote winner);
    its confidence is then the probability of that label.
    """
    pred = probs.argmax(-1) if pred is None else pred
    correct = (pred == labels).float()
    confidence = probs.gather(1, pred[:, None]).squeeze(1)
    losses = nll(probs, labels)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(labels), (n_boot, len(labels)), generator=gen)  # [B, N] resamples
    boot = {
        "top1": 100 * correct[idx].mean(-1),
        "ece": 100 * ece_from(confidence[idx], correct[idx]),
        "nll": losses[idx].mean(-1),
    }
    point = {"top1": 100 * correct.mean(), "ece": 100 * ece_from(confidence, correct), "nll": losses.mean()}
    out: dict[str, float] = {"n": float(len(labels))}
    for key, samples in boot.items():
        lo, hi = torch.quantile(samples, torch.tensor([0.025, 0.975])).tolist()
        out[key] = float(point[key])
        out[f"{key}_lo"], out[f"{key}_hi"] = lo, hi
    if reference is not None:
        out["changed"] = float(100 * (pred != reference).float().mean())
    return out


def brier(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N] the Brier score of each prediction: squared distance of the distribution to the one-hot truth."""
    truth = torch.nn.functional.one_hot(labels, probs.shape[-1]).float()
    return ((probs - truth) ** 2).sum(-1)


def aurc(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk-coverage curve: the error rate among the k most confident answers, averaged
    over k = 1..N. Lower is better; it rewards confidence that ranks right answers above wrong ones."""
    order = torch.argsort(confidence, descending=True, stable=True)
    errors = (1 - correct[order]).cumsum(0)
    return float((errors / torch.arange(1, len(order) + 1)).mean())


def selective(confidence: torch.Tensor, correct: torch.Tensor, threshold: float) -> tuple[float, float]:
    """Accuracy of the answers given at ``threshold`` (confidence >= it) and the share answered (coverage);
    accuracy is NaN when nothing is answered."""
    answered = confidence >= threshold
    accuracy = float(correct[answered].mean()) if answered.any() else float("nan")
    return accuracy, float(answered.float().mean())


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """The probability that a random positive scores above a random negative (ties count half)."""
    scores = torch.cat([positive, negative]).double()
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)  # values ascending
    first = torch.cumsum(counts, 0) - counts + 1  # the rank of each value's first occurrence
    ranks = (first + (counts - 1) / 2)[inverse]  # ties share their mean rank
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
