"""APEX's class-distance weights and the feature blends an adapter is served with."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adapters.fewshot.apply import blend, blend_classes, class_distance_weights


def test_a_training_class_weighs_one_and_a_far_class_less_by_apex_rule() -> None:
    training = torch.eye(4)[:2]  # two training labels, orthogonal
    classes = torch.stack([training[0], F.normalize(torch.tensor([1.0, 0.02, 0, 0]), dim=0), torch.eye(4)[3]])
    w = class_distance_weights(training, classes)
    assert w[0] == 1.0  # the same text
    assert w[1] == 1.0  # within 0.05 of a training label: counted as seen
    # Orthogonal to both: d_nn = 1, d_avg = 1 - mean(0, 0) = 1, weight exp(-4).
    assert math.isclose(float(w[2]), math.exp(-4.0), rel_tol=1e-6)


def test_blends_keep_the_ends_exact_and_renormalize_between() -> None:
    frozen, adapted = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    assert blend(frozen, adapted, 0.0) is frozen and blend(frozen, adapted, 1.0) is adapted
    assert torch.allclose(blend(frozen, adapted, 0.5).norm(dim=-1), torch.ones(3))
    mixed = blend_classes(frozen, adapted, torch.tensor([1.0, 0.0, 0.5]))
    assert torch.allclose(mixed[0], adapted[0]) and torch.allclose(mixed[1], frozen[1])
    assert torch.allclose(mixed[2], blend(frozen[2:], adapted[2:], 0.5)[0])


def test_a_class_without_shots_gets_no_prototype_and_routing_ignores_it() -> None:
    from adapters.fewshot.artifact import prototypes, route_scores

    text = torch.eye(4)[:3]  # three training labels; images of the first only
    image = F.normalize(torch.tensor([[1.0, 0.2, 0, 0], [1.0, -0.2, 0, 0]]), dim=-1)
    protos = prototypes(image, torch.tensor([0, 0]), text)
    assert torch.allclose(protos[0].norm(), torch.tensor(1.0)) and protos[1:].abs().sum() == 0
    # An image of label 2 (never shown) is not routed by its text: only label 0's prototype counts.
    assert float(route_scores(text[2:3], protos)[0]) == pytest.approx(float(text[2] @ protos[0]))
    assert float(route_scores(text[2:3], torch.zeros(3, 4))[0]) == -1.0  # an adapter that saw nothing
