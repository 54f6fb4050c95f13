"""The anchor regularizers and the consistency term: zero gradient where the adapted model is the frozen one;
the description head and the ensemble's weight."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from adapters.common import optimize
from adapters.descriptions import DescriptionFeatures, consistency, head
from adapters.ensemble import EnsembleOptions, adaptive_weight, blend, difficulty, divergence
from adapters.regularizers import anchor_bank, anchor_kl, anchor_texts, divergence_curvature, feature_drift, l2sp

D = 16


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def adapted_through(weight: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """Features through a learnable map that starts as the identity: adapted == frozen at the start."""
    return F.normalize(frozen @ weight, dim=-1)


@pytest.mark.parametrize("kind", ["feature", "anchor_kl", "l2sp"])
def test_each_regularizer_has_zero_gradient_at_the_start_and_not_after(kind):
    frozen = unit(8, D, seed=0)  # [V, D]
    anchors = unit(64, D, seed=1)  # [M, D]
    start = torch.eye(D)

    def term(weight: torch.Tensor) -> torch.Tensor:
        adapted = adapted_through(weight, frozen)
        if kind == "feature":
            return feature_drift(adapted, frozen)
        if kind == "anchor_kl":
            return anchor_kl(adapted, frozen, anchors, scale=50.0)
        return l2sp([weight], [start])

    at_start = start.clone().requires_grad_(True)
    value = term(at_start)
    (grad,) = torch.autograd.grad(value, at_start)
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(grad.abs().max()) < 1e-5
    moved = (start + 0.1 * torch.randn(D, D, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    value = term(moved)
    (grad,) = torch.autograd.grad(value, moved)
    assert float(value.detach()) > 1e-4 and float(grad.abs().max()) > 1e-3  # away from the start they pull back


def test_the_consistency_term_has_zero_gradient_where_classes_meet_their_descriptions():
    means = unit(5, D, seed=3) * 0.7  # description means need not be unit-norm
    present = torch.tensor([True, False, True, True, False])
    descriptions = DescriptionFeatures(means, present)
    classes = F.normalize(means.clone(), dim=-1).requires_grad_(True)
    value = consistency(classes, descriptions)
    (grad,) = torch.autograd.grad(value, classes)
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-6) and float(grad.abs().max()) < 1e-6
    elsewhere = unit(5, D, seed=4).requires_grad_(True)
    value = consistency(elsewhere, descriptions)
    (grad,) = torch.autograd.grad(value, elsewhere)
    assert float(value.detach()) > 0.1
    assert float(grad[~present].abs().max()) == 0.0 and float(grad[present].abs().max()) > 1e-3
    # A step against the gradient brings the described classes nearer their descriptions.
    assert float(consistency(elsewhere.detach() - 0.1 * grad, descriptions)) < float(value.detach())


def test_the_description_head():
    templates = unit(4, D, seed=5) * 0.9  # a template mean: not unit-norm
    means = unit(4, D, seed=6) * 0.8
    present = torch.tensor([True, True, False, True])
    described = DescriptionFeatures(means, present)
    # TPS's micro prototype, bit for bit, at mix 0.5.
    micro = F.normalize(
        torch.stack([(t + d) / 2 if p else t for t, d, p in zip(templates, means, present, strict=True)]), dim=-1
    )
    assert torch.equal(head(templates, described, 0.5), micro)
    assert torch.equal(head(templates, described, 0.0), F.normalize(templates, dim=-1))
    assert torch.equal(head(templates, None, 0.7), F.normalize(templates, dim=-1))
    only = head(templates, described, 1.0)
    assert torch.allclose(only[present], F.normalize(means[present], dim=-1))
    assert torch.equal(only[2], F.normalize(templates, dim=-1)[2])  # a label without descriptions keeps its templates
    # Descriptions that say what the templates say change nothing.
    same = DescriptionFeatures(templates.clone(), torch.ones(4, dtype=torch.bool))
    assert torch.allclose(head(templates, same, 0.5), F.normalize(templates, dim=-1), atol=1e-7)


def test_the_ensemble_weight_and_difficulty():
    a, b = 0.4, 0.1
    weights = [adaptive_weight(d / 20, a, b) for d in range(21)]
    assert all(0.0 <= w <= 1.0 for w in weights)
    assert weights == sorted(weights) and weights[0] < 0.02 and weights[-1] > 0.99
    assert adaptive_weight(a, a, b) == 0.5
    assert adaptive_weight(1e6, 0.0, 1e-3) == 1.0 and adaptive_weight(-1e6, 0.0, 1e-3) == 0.0  # no overflow
    uniform = torch.zeros(10, 7)  # [V, C]
    assert difficulty(uniform) == pytest.approx(1.0)
    sure = torch.full((10, 7), -50.0)
    sure[:, 2] = 50.0
    assert difficulty(sure) == pytest.approx(0.0, abs=1e-6)
    assert difficulty(torch.zeros(10, 1)) == 0.0
    adapted = torch.randn(7)
    assert blend(uniform, adapted, EnsembleOptions()).logits is adapted  # off: the adapted answer, untouched
    mixed = blend(uniform, adapted, EnsembleOptions(mode="adaptive", a=0.5, b=0.1, guard=0.0))  # unguarded
    assert mixed.difficulty == pytest.approx(1.0)
    assert mixed.weight == pytest.approx(1 / (1 + math.exp(-5)))
    assert torch.allclose(mixed.logits, mixed.weight * adapted)
    with pytest.raises(ValueError, match="adapter_alpha"):
        EnsembleOptions(mode="adaptive", policy="class_distance")


def test_the_anchor_bank_ships_and_label_sets_extend_it():
    bank = anchor_bank()
    assert len(bank) >= 50 and len(set(bank)) == len(bank)
    extended = anchor_texts(("a cat, which has whiskers", bank[0]))
    assert extended[: len(bank)] == bank and extended[len(bank) :] == ("a cat, which has whiskers",)


def test_the_divergence_guard_keeps_an_answer_the_frozen_model_does_not_support_near_zero_shot():
    views = torch.zeros(10, 7)  # [V, C]: the frozen model is unsure (difficulty 1), so the plain weight is ~1
    views[0, 3] = 0.5
    agrees = views[0].clone()
    agrees[3] = 1.0  # a little surer of zero-shot's own answer
    goes_astray = views[0].clone()
    goes_astray[5] = 30.0  # certain of a class zero-shot gives no more than the others
    assert float(divergence(views[0], views[0])) == 0.0
    assert 0.0 < float(divergence(agrees, views[0])) < 1.0 < float(divergence(goes_astray, views[0]))
    options = EnsembleOptions(mode="adaptive", a=0.5, b=0.1, guard=0.3)
    plain = adaptive_weight(difficulty(views), 0.5, 0.1)
    assert plain > 0.99
    for adapted in (agrees, goes_astray):
        got = blend(views, adapted, options)
        assert got.divergence == pytest.approx(float(divergence(adapted, views[0])))
        assert got.weight == pytest.approx(plain * math.exp(-got.divergence / 0.3), rel=1e-12)
        assert torch.allclose(got.logits, got.weight * adapted + (1 - got.weight) * views[0])
    astray = blend(views, goes_astray, options)
    assert astray.weight < 0.01 and int(astray.logits.argmax()) == 3  # the zero-shot answer stands
    assert blend(views, agrees, options).weight > 0.5
    assert blend(views, goes_astray, EnsembleOptions(mode="adaptive", a=0.5, b=0.1, guard=0.0)).weight == plain
    fixed = blend(views, goes_astray, EnsembleOptions(mode="fixed", weight=0.4))
    assert fixed.weight == 0.4 and fixed.divergence is not None  # fixed mode reports the divergence, unguarded
    off = blend(views, goes_astray, EnsembleOptions(mode="off", guard=0.3))
    assert off.logits is goes_astray and off.weight == 1.0 and off.divergence is None
    with pytest.raises(ValueError, match="guard"):
        EnsembleOptions(guard=-1.0)


def test_l2sp_pulls_toward_the_start_more_as_its_weight_grows_even_at_a_high_learning_rate():
    start = torch.randn(32, generator=torch.Generator().manual_seed(7))
    target = start + 3.0  # the loss pulls every coordinate away from the start

    def drift(weight: float, steps: int, lr: float = 0.5) -> float:
        p = start.clone().requires_grad_(True)
        optimize([[p]], lr, steps, lambda step: [(p - target).pow(2).sum()], anchor=[[start]], anchor_weight=weight)
        return float((p.detach() - start).norm())

    drifts = [drift(w, steps=5) for w in (0.0, 0.1, 1.0, 10.0, 100.0, 1000.0)]
    assert all(later < earlier for earlier, later in itertools.pairwise(drifts))
    assert drifts[-1] < 0.01 * drifts[0]
    # One step is unchanged at any weight: like the loss terms, the pull acts from the second step on.
    assert drift(1000.0, steps=1) == drift(0.0, steps=1)


def test_the_pull_is_taken_in_adams_metric_so_it_weighs_against_each_parameters_own_gradient():
    start = torch.zeros(2)
    scale = torch.tensor([100.0, 0.01])  # the loss pulls both away from the start, one far harder than the other

    def moved(weight: float) -> torch.Tensor:
        p = start.clone().requires_grad_(True)
        optimize([[p]], 0.05, 5, lambda step: [-(scale * p).sum()], anchor=[[start]], anchor_weight=weight)
        return p.detach().abs()

    free = moved(0.0)
    assert float(free[1]) == pytest.approx(float(free[0]), rel=1e-3)  # Adam alone moves both alike
    pulled = moved(1.0)
    assert float(pulled[0]) > 0.5 * float(free[0])  # a weight of 1 against a gradient of 100: a light pull
    assert float(pulled[1]) < 0.05 * float(free[1])  # against a gradient of 0.01: (nearly) back to the start


@pytest.mark.parametrize("kind", ["feature", "anchor_kl"])
def test_a_divergence_pulls_as_l2sp_would_at_its_curvature_along_the_displacement(kind):
    frozen = unit(8, D, seed=0)
    anchors = unit(64, D, seed=1)
    start = torch.eye(D)

    def divergence(weight: torch.Tensor) -> torch.Tensor:
        adapted = adapted_through(weight, frozen)
        return feature_drift(adapted, frozen) if kind == "feature" else anchor_kl(adapted, frozen, anchors, 50.0)

    assert divergence_curvature(divergence(start), [start], [start]) == 0.0
    moved = start + 0.05 * torch.randn(D, D, generator=torch.Generator().manual_seed(2))
    value = divergence(moved)
    curvature = divergence_curvature(value, [moved], [start])
    assert curvature * float(l2sp([moved], [start])) == pytest.approx(float(value), rel=1e-5)  # equal at p
    # A displacement that leaves every view's features alone (a rescaling: they are normalised) is not pulled.
    assert divergence_curvature(divergence(1.5 * start), [1.5 * start], [start]) < 1e-6 * curvature
