"""Shared objectives against values worked out by hand and naive loops over the official formulas."""

from __future__ import annotations

import math

import pytest
import torch

from adapters.losses import dispersion, entropy, marginal_entropy, select_confident, ttl_weighted_entropy


def naive_entropy(row: list[float]) -> float:
    z = sum(math.exp(v) for v in row)
    return -sum(math.exp(v) / z * math.log(math.exp(v) / z) for v in row if math.exp(v) > 0)


def random_logits(*shape: int, seed: int = 0, scale: float = 5.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_entropy_by_hand_and_by_loop():
    assert entropy(torch.zeros(7)).item() == pytest.approx(math.log(7))  # uniform: ln C nats
    assert entropy(torch.tensor([0.0, math.log(3.0)])).item() == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    )
    assert entropy(torch.tensor([100.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-40)
    logits = random_logits(6, 5)
    expected = [naive_entropy(r) for r in logits.tolist()]
    assert entropy(logits).tolist() == pytest.approx(expected, rel=1e-12)
    assert entropy(logits.view(2, 3, 5)).shape == (2, 3)


def test_marginal_entropy_is_the_entropy_of_the_mean_prediction():
    logits = random_logits(6, 4)
    mean = [0.0] * 4
    for row in logits.tolist():
        z = sum(math.exp(v) for v in row)
        for c, v in enumerate(row):
            mean[c] += math.exp(v) / z / 6
    expected = -sum(p * math.log(p) for p in mean)
    assert marginal_entropy(logits).item() == pytest.approx(expected, rel=1e-12)
    # Two confident views that disagree: the mean is 50/50, a full ln 2 nats.
    assert marginal_entropy(torch.tensor([[50.0, 0.0], [0.0, 50.0]])).item() == pytest.approx(math.log(2), rel=1e-6)


def test_marginal_entropy_treats_impossible_classes_as_zero_not_nan():
    # TPT clamps the averaged log-probabilities to the dtype's min: a class no view can pick adds 0.
    logits = torch.tensor([[0.0, 0.0, -math.inf], [0.0, 0.0, -math.inf]])
    assert marginal_entropy(logits).item() == pytest.approx(math.log(2))
    assert torch.isfinite(marginal_entropy(torch.tensor([[1e4, -1e4, 0.0]])))


def test_marginal_entropy_of_stacked_requests_is_each_requests():
    logits = random_logits(3, 6, 5)
    stacked = marginal_entropy(logits)
    assert stacked.shape == (3,)
    for r in range(3):
        assert stacked[r].item() == pytest.approx(marginal_entropy(logits[r]).item(), rel=1e-12)


def test_select_confident_keeps_the_lowest_entropy_fraction_most_confident_first():
    # Row k has entropy decreasing in its margin; margins chosen so the order is known by hand.
    margins = [0.5, 9.0, 2.0, 7.0, 0.1, 5.0, 3.0, 8.0, 1.0, 4.0]
    logits = torch.tensor([[m, 0.0, 0.0] for m in margins])
    assert select_confident(logits, 0.3).tolist() == [1, 7, 3]  # int(10 * 0.3) = 3
    assert select_confident(logits, 0.1).tolist() == [1]
    assert select_confident(logits, 0.01).tolist() == [1]  # int(0.1) = 0, at least one is kept
    assert select_confident(logits, 1.0).tolist() == [1, 7, 3, 5, 9, 6, 2, 8, 0, 4]
    # TPT's 64 views at selection_p 0.1 keep 6.
    assert len(select_confident(random_logits(64, 10), 0.1)) == 6


def test_select_confident_breaks_ties_by_view_order():
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    assert select_confident(logits, 0.4).tolist() == [1, 3]
    assert select_confident(logits, 0.8).tolist() == [1, 3, 0, 2]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_select_confident_refuses_bad_fractions(fraction):
    with pytest.raises(ValueError, match="fraction"):
        select_confident(torch.zeros(4, 3), fraction)


def test_ttl_weighted_entropy_value_and_detached_weights():
    logits = random_logits(8, 10, scale=2.0).requires_grad_(True)
    loss = ttl_weighted_entropy(logits, tau=0.4)
    hs = [naive_entropy(r) for r in logits.tolist()]
    assert loss.item() == pytest.approx(sum(h * math.exp(-(h - 0.4)) for h in hs) / 8, rel=1e-12)
    # The weights are constants: the gradient is that of sum_i w_i * H_i / N with w_i fixed numbers.
    (grad,) = torch.autograd.grad(loss, logits)
    weights = torch.tensor([math.exp(-(h - 0.4)) for h in hs], dtype=torch.float64)
    (expected,) = torch.autograd.grad((weights * entropy(logits)).mean(), logits)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
    # ... which is not the gradient of the loss with the weights left attached.
    h = entropy(logits)
    (attached,) = torch.autograd.grad((h * torch.exp(-(h - 0.4))).mean(), logits)
    assert not torch.allclose(grad, attached)


def test_ttl_drops_views_above_ln_1000_as_ttls_code_does():
    c = 2000
    sure = torch.zeros(3, c, dtype=torch.float64)
    sure[:, 0] = 20.0
    uniform = torch.zeros(1, c, dtype=torch.float64)  # entropy ln 2000 > ln 1000: dropped
    both = torch.cat([sure, uniform])
    assert ttl_weighted_entropy(both).item() == pytest.approx(ttl_weighted_entropy(sure).item(), rel=1e-12)
    # Nothing passes: the loss is 0 with a zero gradient (TTL skips the step).
    only = uniform.clone().requires_grad_(True)
    loss = ttl_weighted_entropy(only)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(only.grad) == 0


def test_ttl_weighted_entropy_of_stacked_requests_is_each_requests():
    logits = random_logits(3, 8, 10)
    stacked = ttl_weighted_entropy(logits)
    for r in range(3):
        assert stacked[r].item() == pytest.approx(ttl_weighted_entropy(logits[r]).item(), rel=1e-12)


def test_dispersion_by_hand():
    # Two orthogonal unit vectors: centroid (1/2, 1/2), each sqrt(1/2) away.
    assert dispersion(torch.eye(2)).item() == pytest.approx(math.sqrt(0.5))
    # Collapsed classes: no dispersion. Scale does not matter: features are normalised first.
    assert dispersion(torch.ones(5, 3)).item() == pytest.approx(0.0, abs=1e-7)
    assert dispersion(torch.tensor([[3.0, 0.0], [0.0, 0.5]])).item() == pytest.approx(math.sqrt(0.5))


def test_dispersion_matches_a_loop_and_stacks():
    feats = random_logits(2, 6, 4)
    for r in range(2):
        t = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in feats[r].tolist()]
        centroid = [sum(row[d] for row in t) / 6 for d in range(4)]
        expected = sum(math.sqrt(sum((row[d] - centroid[d]) ** 2 for d in range(4))) for row in t) / 6
        assert dispersion(feats[r]).item() == pytest.approx(expected, rel=1e-12)
        assert dispersion(feats)[r].item() == pytest.approx(expected, rel=1e-12)
