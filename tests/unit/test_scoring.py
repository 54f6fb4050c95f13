"""The benchmark's scores, checked against values worked out by hand."""

from __future__ import annotations

import torch

from benchmarks._lib.scoring import ece_from, reliability, score


def test_ece_by_hand():
    # Two bins used: 0.9 confidence with 1/2 correct (gap 0.4), 0.6 confidence with 2/2 correct (gap 0.4).
    confidence = torch.tensor([0.9, 0.9, 0.6, 0.6])
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert ece_from(confidence, correct).item() == pytest_approx(0.4)
    d = reliability(confidence, correct)
    assert sum(d["count"]) == 4 and max(d["accuracy"]) == 1.0


def pytest_approx(x: float):
    import pytest

    return pytest.approx(x, abs=1e-6)


def test_score_top1_nll_changed_and_intervals():
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 1, 0])
    reference = torch.tensor([0, 0, 0, 0])
    s = score(probs, labels, reference, n_boot=200)
    assert s["top1"] == pytest_approx(75.0)  # argmax of [0.5, 0.5] is class 0: correct
    expected_nll = -(torch.log(torch.tensor([0.7, 0.8, 0.4, 0.5]))).mean().item()
    assert s["nll"] == pytest_approx(expected_nll)
    assert s["changed"] == pytest_approx(25.0)
    for key in ("top1", "ece", "nll"):
        assert s[f"{key}_lo"] <= s[key] <= s[f"{key}_hi"]


def test_score_with_a_label_that_is_not_the_argmax():
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    s = score(probs, torch.tensor([1, 1]), pred=torch.tensor([1, 1]), n_boot=50)
    assert s["top1"] == pytest_approx(100.0)
    # confidences 0.4 and 0.7, both right: ECE = (0.6 + 0.3) / 2
    assert s["ece"] == pytest_approx(45.0)
