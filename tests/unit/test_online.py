"""The online states of sessions (``adapters.online``) on features worked out by hand or drawn at random."""

from __future__ import annotations

import pytest
import torch

from adapters.online import TDA, Stats


def unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_tda_keeps_the_lowest_entropy_features_per_class_within_its_capacity():
    torch.manual_seed(0)
    n_classes, dim = 4, 16
    state = TDA(n_classes, dim)
    feats = torch.nn.functional.normalize(torch.randn(200, dim), dim=-1)
    logits = 30 * torch.randn(200, n_classes)
    state.apply(feats, logits, 30.0)
    assert all(len(entropies) <= TDA.pos_shots for _, entropies in state.pos.values())
    assert 0 < state.nbytes <= TDA.capacity_bytes(n_classes, dim)
    # The kept positives of each class are its lowest-entropy images among those it was the zero-shot label of.
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1) / torch.log(torch.tensor(float(n_classes)))
    for label, (_, kept) in state.pos.items():
        mine = entropy[probs.argmax(-1) == label].sort().values[: TDA.pos_shots]
        assert torch.allclose(torch.tensor(sorted(kept)), mine, atol=1e-5)


def test_tda_moves_an_answer_toward_cached_images_it_resembles():
    state = TDA(2, 2)
    cats, dog_like_cat = unit([1.0, 0.0], [0.99, -0.01]), unit([0.95, 0.05])
    state.apply(cats, torch.tensor([[10.0, 0.0], [10.0, 0.0]]), 100.0)  # confident cats: cached under class 0
    # A near-copy that zero-shot finds slightly more like class 1 (and is cached there itself, as in TDA,
    # adding pos_alpha to class 1): the two cached cats tip it to class 0.
    out, (report,) = state.apply(dog_like_cat, torch.tensor([[0.0, 1.0]]), 100.0)
    assert out[0, 0] > out[0, 1] and report.changed and report.weight > 1.5
    assert abs(report.disagreement - 1 / 3) < 1e-9  # of its three answers, one differed from zero-shot's


def test_stats_starts_as_zero_shot_and_its_weight_grows_with_the_count():
    torch.manual_seed(1)
    state = Stats(3, 8)
    feats = torch.nn.functional.normalize(torch.randn(12, 8), dim=-1)
    logits = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]]).repeat(4, 1)
    out, reports = state.apply(feats, logits, 10.0)
    assert torch.equal(out[0], logits[0])  # nothing seen yet: exactly zero-shot
    weights = [r.weight for r in reports[3::3]]  # class 0's answers once every class has statistics
    assert weights == sorted(weights) and 0 < weights[0] < weights[-1] < 1
    assert state.counts is not None and float(state.counts.sum()) <= 12  # at most 1 per image
    assert [r.entries for r in reports] == list(range(1, 13))
    assert state.nbytes == Stats.capacity_bytes(3, 8)


def test_one_image_adds_at_most_one_unit_of_weight_however_confident():
    state = Stats(2, 2)
    state.apply(unit([1.0, 0.0]), torch.tensor([[1e4, -1e4]]), 100.0)
    assert state.counts is not None and float(state.counts.sum()) <= 1.0
    assert TDA.capacity_bytes(10, 4) == 10 * 4 * (3 * 4 + 2 * (4 + 10))


@pytest.mark.parametrize("method", [TDA, Stats])
def test_a_restored_state_goes_on_exactly_as_the_one_it_was_kept_from(method) -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen), dim=-1)
    logits = 3 * torch.randn(40, 5, generator=gen)
    kept = method(5, 8)
    kept.apply(feats[:20], logits[:20], 100.0)
    restored = method.restore(5, 8, kept.to_tensors())
    assert restored.describe() == kept.describe()
    after_kept, _ = kept.apply(feats[20:], logits[20:], 100.0)
    after_restored, _ = restored.apply(feats[20:], logits[20:], 100.0)
    assert torch.equal(after_kept, after_restored)
    assert restored.describe() == kept.describe()
