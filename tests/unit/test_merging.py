"""Merging adapters (F7): EMR's exactness cases, its masks and rescalers, TIES and task arithmetic by hand,
merges on full LoRA updates, idempotence, the per-member trigger as bytes, and the refusals.

Adapters are synthetic (no model). Their values are multiples of 1/256 in [-1, 1], so that sums and
differences in the artifact round trip (ctx = ctx_init + delta, W = I + delta) are exact in float32 and
"exact" can be asserted bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adapters.fewshot.artifact import Adapter, AdapterCard, ArtifactError
from adapters.fewshot.merging import (
    MergeError,
    Trigger,
    emr_deltas,
    fidelity,
    merge,
    pack_mask,
    reconstruct,
    ties_deltas,
    trim,
    unpack_mask,
)

DIM, WIDTH, N_CTX, RANK = 8, 6, 3, 2
LORA_SHAPES = ((12, 8), (12, 8))  # two projections, [out, in]
PARTS = {"prompt": ("prompt",), "apex": ("text_adapter", "lora"), "lora": ("lora",)}


def dyadic(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(-256, 257, shape, generator=gen).float() / 256


def gaussian(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen) / 3


def make(
    kind: str,
    labels: tuple[str, ...],
    seed: int,
    *,
    base: str = "base-a",
    ctx_init: str = "a photo of a",
    dense: bool = False,
    lora_shapes: tuple[tuple[int, int], ...] = LORA_SHAPES,
    exact_values: bool = True,
) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    values = dyadic if exact_values else gaussian
    t = {
        "label_features": F.normalize(torch.randn(len(labels), DIM, generator=gen), dim=-1),
        "prototypes": F.normalize(torch.randn(len(labels), DIM, generator=gen), dim=-1),
    }
    parts = PARTS[kind]
    if "prompt" in parts:
        # the same starting text for every seed
        t["prompt.ctx_init"] = (
            torch.ones(N_CTX, WIDTH) / 4
            if exact_values
            else 3 * torch.randn(N_CTX, WIDTH, generator=torch.Generator().manual_seed(0))
        )
        t["prompt.ctx"] = t["prompt.ctx_init"] + values(gen, N_CTX, WIDTH) / 4
    if "text_adapter" in parts:
        t["text.weight"] = torch.eye(DIM) + values(gen, DIM, DIM) / 8
        t["text.bias"] = values(gen, DIM) / 8
    if "lora" in parts:
        for i, (out, inp) in enumerate(lora_shapes):
            a, b = values(gen, RANK, inp), values(gen, out, RANK)
            if dense:
                t[f"lora.{i}.delta"] = (4.0 / RANK) * b @ a
            else:
                t[f"lora.{i}.a"], t[f"lora.{i}.b"] = a, b
    card = AdapterCard(
        type=kind, parts=parts, base_model=base, labels=labels, ctx_init=ctx_init if "prompt" in parts else None,
        lora_alpha=4.0,
    )  # fmt: skip
    return Adapter(card, t)


def equal_deltas(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("kind", ["prompt", "apex", "lora"])
def test_one_member_emr_reconstructs_it_exactly_with_rescaler_one(kind: str) -> None:
    member = make(kind, ("cat", "dog"), seed=1)
    merged = merge([member], "emr")
    (only,) = merged.members
    assert only.rescaler == 1.0
    assert equal_deltas(only.reconstruction.deltas(), member.deltas())
    assert only.fidelity == pytest.approx(1.0, abs=1e-12)
    nonzero = sum(int((d != 0).sum()) for d in member.deltas().values())
    assert only.mask_density == nonzero / sum(d.numel() for d in member.deltas().values())
    assert only.reconstruction.card.labels == ("cat", "dog")
    assert torch.equal(only.reconstruction.tensors["prototypes"], member.tensors["prototypes"])


def test_identical_members_are_reconstructed_exactly() -> None:
    member = make("apex", ("cat",), seed=2)
    merged = merge([member, make("apex", ("cat",), seed=2), make("apex", ("cat",), seed=2)], "emr")
    for m in merged.members:
        assert m.rescaler == 1.0
        assert equal_deltas(m.reconstruction.deltas(), member.deltas())
    assert equal_deltas(merged.unified.deltas(), member.deltas())


def test_masks_are_the_members_agreement_with_the_elected_sign_and_the_unified_takes_the_largest() -> None:
    members = [make("apex", (f"c{i}",), seed=10 + i) for i in range(4)]
    originals = [m.deltas() for m in members]
    unified, masks, rescalers = emr_deltas(originals)
    for key in unified:
        stacked = torch.stack([d[key] for d in originals])
        elected = torch.where(stacked.mean(0) > 0, 1.0, -1.0)
        largest = torch.zeros_like(unified[key])
        for i, d in enumerate(originals):
            mask = masks[i][key]
            assert not (mask & ~(d[key] * elected > 0)).any()  # mask within sign agreement
            assert not (mask & (d[key] == 0)).any()
            largest = torch.maximum(largest, torch.where(mask, d[key].abs(), 0.0))
        assert torch.equal(unified[key].abs(), largest)
        assert not (unified[key] * elected < 0).any()
    assert all(math.isfinite(r) and r > 0 for r in rescalers)
    merged = merge(members, "emr")
    for m, original in zip(merged.members, originals, strict=True):
        assert 0 < m.mask_density < 1
        assert m.fidelity == pytest.approx(fidelity(m.reconstruction.deltas(), original))
        assert 0 < m.fidelity < 1  # lossy for disagreeing members


def test_emr_and_ties_by_hand() -> None:
    # per column: (1, 2, -4), (3, -1, -1), (2, 2, 0), (0, 0, 0), (1, -1, 0)
    cols = torch.tensor([[1.0, 3, 2, 0, 1], [2, -1, 2, 0, -1], [-4, -1, 0, 0, 0]])
    members = [{"x": row} for row in cols]
    unified, masks, rescalers = emr_deltas(members)
    # a mean of 0 elects the negative sign (the last two columns): magnitude 0 there, 1 from member 2 here
    assert unified["x"].tolist() == [-4.0, 3.0, 2.0, 0.0, -1.0]
    assert [m["x"].tolist() for m in masks] == [
        [False, True, True, False, False],
        [False, False, True, False, True],
        [True, False, False, False, False],
    ]
    # mean|tau_i| / mean|M_i tau_uni|: (7/5) / (5/5), (6/5) / (3/5), (5/5) / (4/5)
    assert rescalers == pytest.approx([1.4, 2.0, 1.25])
    # TIES at density 1: sums -1, 1, 4, 0, 0 elect -, +, + and, where the sum is 0, the majority (+);
    # then the disjoint mean of -4 | 3 | 2, 2 (the 0 does not count) | - | 1.
    assert ties_deltas(members, density=1.0, scale=1.0)["x"].tolist() == [-4.0, 3.0, 2.0, 0.0, 1.0]
    assert ties_deltas(members, density=1.0, scale=0.5)["x"].tolist() == [-2.0, 1.5, 1.0, 0.0, 0.5]


def test_an_empty_mask_gets_rescaler_one_and_a_zero_reconstruction() -> None:
    big, small = {"x": torch.tensor([4.0, -4.0])}, {"x": torch.tensor([-1.0, 1.0])}
    _, masks, rescalers = emr_deltas([big, small])
    assert not masks[1]["x"].any()
    assert rescalers == [1.0, 1.0]


def test_lora_merges_the_full_update_not_the_factors() -> None:
    factored = [make("lora", (f"c{i}",), seed=20 + i) for i in range(3)]
    dense = [make("lora", (f"c{i}",), seed=20 + i, dense=True) for i in range(3)]
    for method in ("emr", "ties", "task_arithmetic"):
        a, b = merge(factored, method), merge(dense, method)
        assert equal_deltas(a.unified.deltas(), b.unified.deltas()), method
        assert a.unified.lora_dense
        for ma, mb in zip(a.members, b.members, strict=True):
            assert equal_deltas(ma.reconstruction.deltas(), mb.reconstruction.deltas())
    # Merging A and B separately and multiplying afterwards gives another update altogether.
    unified = merge(factored, "emr").unified.deltas()
    for i in range(len(LORA_SHAPES)):
        a_uni, _, _ = emr_deltas([{"a": m.tensors[f"lora.{i}.a"]} for m in factored])
        b_uni, _, _ = emr_deltas([{"b": m.tensors[f"lora.{i}.b"]} for m in factored])
        naive = (4.0 / RANK) * b_uni["b"] @ a_uni["a"]
        assert (naive - unified[f"lora.{i}"]).norm() > 0.5 * unified[f"lora.{i}"].norm()


@pytest.mark.parametrize("method", ["emr", "ties", "task_arithmetic"])
def test_merging_the_same_group_again_gives_the_same_unified_adapter(method: str) -> None:
    members = [make("apex", (f"c{i}",), seed=30 + i) for i in range(3)]
    first, again = merge(members, method), merge(members, method)
    assert first.unified.tensors.keys() == again.unified.tensors.keys()
    assert all(torch.equal(first.unified.tensors[k], again.unified.tensors[k]) for k in first.unified.tensors)
    for a, b in zip(first.members, again.members, strict=True):
        assert equal_deltas(a.reconstruction.deltas(), b.reconstruction.deltas())
        assert a.rescaler == b.rescaler


def test_emr_of_a_merged_adapter_alone_is_that_adapter() -> None:
    unified = merge([make("apex", (f"c{i}",), seed=40 + i) for i in range(3)], "emr").unified
    again = merge([unified], "emr").unified
    assert equal_deltas(again.deltas(), unified.deltas())
    assert again.card.labels == unified.card.labels


def test_task_arithmetic_of_one_member_at_scale_one_is_that_member_and_sums_with_the_default_scale() -> None:
    member = make("prompt", ("cat",), seed=50)
    merged = merge([member], "task_arithmetic", scale=1.0)
    assert equal_deltas(merged.unified.deltas(), member.deltas())
    assert merged.members[0].reconstruction is merged.unified
    assert merged.members[0].fidelity == pytest.approx(1.0, abs=1e-12)
    members = [make("prompt", (f"c{i}",), seed=51 + i) for i in range(4)]
    summed = merge(members, "task_arithmetic").unified.deltas()["prompt.ctx"]
    expected = 0.5 * torch.stack([m.deltas()["prompt.ctx"] for m in members]).sum(0)  # 1 / sqrt(4)
    assert torch.allclose(summed, expected, atol=1e-6, rtol=0)
    assert merge([members[0]], "task_arithmetic").unified.card.training["scale"] == 1.0
    assert merge(members * 4, "task_arithmetic").unified.card.training["scale"] == 0.3  # 1 / sqrt(16) floored


def test_ties_trim_keeps_the_top_fraction_by_magnitude() -> None:
    delta = torch.randn(40, 25, generator=torch.Generator().manual_seed(3))
    kept = trim(delta, 0.2)
    nonzero = kept != 0
    assert int(nonzero.sum()) == 200
    assert torch.equal(kept[nonzero], delta[nonzero])
    assert delta[nonzero].abs().min() >= delta[~nonzero].abs().max()
    assert int((trim(delta, 0.001) != 0).sum()) == 1  # at least one entry
    one = {"x": delta}
    assert torch.equal(ties_deltas([one], density=0.2, scale=1.0)["x"], kept)


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 5, 7), (64, 48)])
def test_masks_pack_to_bits_and_back(shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)


def test_pack_mask_uses_numpy_bit_order_and_unpack_refuses_a_wrong_length() -> None:
    assert pack_mask(torch.tensor([True, False, False, False, False, False, False, True, True])).tolist() == [129, 128]
    with pytest.raises(ArtifactError, match=r"uint8 \[2\]"):
        unpack_mask(torch.zeros(3, dtype=torch.uint8), (3, 5))


@pytest.mark.parametrize("kind", ["prompt", "apex"])
@pytest.mark.parametrize("exact_values", [True, False])
def test_a_member_comes_back_exactly_from_the_stored_unified_artifact_and_its_trigger(
    kind: str, exact_values: bool
) -> None:
    members = [
        make(kind, ("cat", "dog"), seed=60, exact_values=exact_values),
        make(kind, ("dog", "fox"), seed=61, exact_values=exact_values),
    ]
    merged = merge(members, "emr", names=["pets@v1", "wild@v3"])
    unified = Adapter.from_bytes(merged.unified.to_bytes())
    for m in merged.members:
        data = m.trigger.to_bytes()
        back = reconstruct(unified, Trigger.from_bytes(data))
        assert back.card == m.reconstruction.card
        assert back.tensors.keys() == m.reconstruction.tensors.keys()
        assert all(torch.equal(back.tensors[k], m.reconstruction.tensors[k]) for k in back.tensors)
        n_entries = sum(d.numel() for d in m.reconstruction.deltas().values())
        assert len(data) < n_entries / 8 + 4 * 2 * 2 * DIM + 4096  # bits, the label rows, the header
    ta = merge(members, "task_arithmetic")
    assert reconstruct(ta.unified, Trigger.from_bytes(ta.members[1].trigger.to_bytes())) is ta.unified


def test_a_trigger_from_another_merge_or_garbage_is_refused() -> None:
    apex = merge([make("apex", ("cat",), seed=70)], "emr")
    lora = merge([make("lora", ("cat",), seed=71)], "emr")
    with pytest.raises(ArtifactError, match="another merge"):
        reconstruct(lora.unified, apex.members[0].trigger)
    with pytest.raises(ArtifactError, match="not a merge trigger"):
        Trigger.from_bytes(b"\x00" * 20)


def test_the_unified_adapter_serves_the_union_of_labels() -> None:
    a, b = make("apex", ("cat", "dog"), seed=80), make("apex", ("dog", "fox"), seed=81)
    unified = merge([a, b], "ties").unified
    assert unified.card.type == "merged"
    assert unified.card.parts == a.card.parts
    assert unified.card.base_model == "base-a"
    assert unified.card.labels == ("cat", "dog", "fox")
    lf, protos = unified.tensors["label_features"], unified.tensors["prototypes"]
    assert torch.equal(lf[1], a.tensors["label_features"][1])  # the first member's row for a shared label
    assert torch.equal(lf[2], b.tensors["label_features"][1])
    mean_dog = F.normalize((a.tensors["prototypes"][1] + b.tensors["prototypes"][0]) / 2, dim=0)
    assert torch.allclose(protos[1], mean_dog, atol=1e-6)
    assert torch.equal(protos[0], a.tensors["prototypes"][0])
    assert unified.card.metrics["member1.rescaler"] == 1.0
    assert unified.card.training["density"] == 0.2
    assert Adapter.from_bytes(unified.to_bytes()).card.labels == unified.card.labels


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (make("apex", ("x",), seed=1, base="base-b"), "other was made for base model base-b, first for base-a"),
        (make("lora", ("x",), seed=1), r"other has parts \['lora'\], first has \['text_adapter', 'lora'\]"),
        (make("apex", ("x",), seed=1, lora_shapes=((12, 8),)), r"lora\.1: \[\] against \[12, 8\]"),
        (make("apex", ("x",), seed=1, lora_shapes=((12, 8), (16, 8))), r"lora\.1: \[16, 8\] against \[12, 8\]"),
    ],
)
def test_members_that_cannot_merge_are_refused_naming_the_difference(other: Adapter, match: str) -> None:
    with pytest.raises(MergeError, match=match):
        merge([make("apex", ("c",), seed=0), other], "emr", names=["first", "other"])


def test_prompts_from_different_starting_texts_and_bad_settings_are_refused() -> None:
    a, b = make("prompt", ("c",), seed=0), make("prompt", ("d",), seed=1, ctx_init="a picture of a")
    with pytest.raises(MergeError, match=r"'a picture of a'.*'a photo of a'"):
        merge([a, b], "ties")
    with pytest.raises(MergeError, match="unknown merge method 'dare'"):
        merge([a], "dare")
    with pytest.raises(MergeError, match="at least one"):
        merge([], "emr")
    with pytest.raises(MergeError, match="emr takes no scale"):
        merge([a], "emr", scale=0.5)
    with pytest.raises(MergeError, match="task_arithmetic takes none"):
        merge([a], "task_arithmetic", density=0.5)
    with pytest.raises(MergeError, match="density must be in"):
        merge([a], "ties", density=0.0)
    with pytest.raises(MergeError, match="scale must be a positive"):
        merge([a], "task_arithmetic", scale=-1.0)
