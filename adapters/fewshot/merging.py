"""Merging a group of adapters into one: task arithmetic, TIES, and EMR as ConDU uses it (issue 16, F7).

Every method acts on the members' full-weight updates (``Adapter.deltas()``: a LoRA part as its
(alpha / r) B A, never the factors separately, whose product a factor-wise merge would not preserve),
always from the originals: ConDU re-unifies its lossy reconstructions at every session, which compounds
the loss (seed_systems.md §4.3), so a group is merged again from its members, never from its last merge.

- ``task_arithmetic`` (Ilharco et al., ICLR 2023, arXiv 2212.04089): ``scale * sum_i tau_i``. The
  paper picks one scaling coefficient in [0, 1] on held-out data; FusionBench's eight-task CLIP runs use
  0.3. Without held-out data we default to ``1 / sqrt(n)`` within [0.3, 1]: a member merged alone is
  itself, and the sum of n roughly orthogonal updates keeps about one member's norm (0.35 for eight).
- ``ties`` (Yadav et al., NeurIPS 2023, arXiv 2306.01708): keep each member's largest-magnitude
  ``density`` fraction (default 0.2), elect each entry's sign by the sum of the trimmed values (where
  that is zero, the majority of the elected signs, as the official code does; + on a tie), average the
  entries that agree with it (the disjoint mean) and multiply by ``scale`` (default 1, the paper's). Ours trims per
  tensor, not over the member's whole vector: a prompt context, a text-space map and a vision LoRA live
  on different scales, and one threshold over all of them would erase whole parts.
- ``emr`` (EMR-Merging, Huang et al., NeurIPS 2024, arXiv 2405.17461; ConDU's unify step, arXiv
  2503.10705): the elected sign is the sign of the mean update, zeros counted as negative (as in both
  official codes); ``tau_uni`` = elected sign * the largest |tau_i| among the members that agree with it
  (0 where none does); member i's mask ``M_i = tau_i * sign > 0`` and its rescaler
  ``lambda_i = sum_t mean|tau_i| / sum_t mean|M_i * tau_uni|`` over the update tensors t (each tensor's
  mean counts once, whatever its size, as in the official code). Member i is served as
  ``lambda_i * (M_i * tau_uni)``. A member whose mask is empty gets rescaler 1 (its reconstruction is zero
  anyway; the official code divides by zero there).

task arithmetic and TIES yield one adapter for everyone: a member's "reconstruction" is the unified
adapter itself, with rescaler 1 and mask density 1. EMR stores, per member, a ``Trigger`` (ConDU's task
trigger: bit-packed masks, the rescaler, the member's card and its label rows) next to the unified
artifact; ``reconstruct(unified, trigger)`` rebuilds the member exactly as ``merge`` returned it (both
start from the updates the stored unified artifact gives back, ``unified.deltas()``).

A merged LoRA part is dense ([out, in] per target): for ViT-B/16 with rank-8 LoRA on q and v, 57 MB
unified against 1.2 MB per factored member, and 1.8 MB per EMR trigger. EMR saves storage only for full
finetunes; for small adapters it buys one artifact, not less memory (seed_systems.md F7).

The unified adapter is served like any other (card type ``"merged"``). Its labels are the members'
labels in order, each once; a label several members share keeps the first such member's frozen text
embedding (the same text on the same model) and the normalized mean of their prototypes (ConDU's
prototype of the pooled classes, each member weighted equally).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from adapters.fewshot.artifact import Adapter, AdapterCard, ArtifactError

METHODS = ("task_arithmetic", "ties", "emr")
TIES_DENSITY = 0.2
TIES_SCALE = 1.0
TRIGGER_KEY = "ttaserve.trigger"  # the safetensors metadata entry of a member's trigger
Deltas = dict[str, torch.Tensor]


class MergeError(ValueError):
    """These adapters cannot be merged (or not with these settings); the message names the difference."""


# -- the rules, on full-weight updates ----------------------------------------------------------------
def task_arithmetic_deltas(deltas: Sequence[Mapping[str, torch.Tensor]], scale: float) -> Deltas:
    """``scale * sum_i tau_i`` per tensor."""
    return {key: scale * torch.stack([d[key] for d in deltas]).sum(0) for key in deltas[0]}


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: keep the ``round(density * numel)`` (at least one) largest-magnitude entries, zero the rest."""
    n = delta.numel()
    keep = min(n, max(1, round(density * n)))
    if keep >= n:
        return delta.clone()
    flat = delta.flatten()
    index = flat.abs().topk(keep).indices
    out = torch.zeros_like(flat)
    out[index] = flat[index]
    return out.view_as(delta)


def ties_deltas(deltas: Sequence[Mapping[str, torch.Tensor]], density: float, scale: float) -> Deltas:
    """TIES: trim each member, elect the sign by the trimmed sum, average the agreeing entries, scale."""
    out = {}
    for key in deltas[0]:
        stacked = torch.stack([trim(d[key], density) for d in deltas])  # [n, ...]
        sign = torch.sign(stacked.sum(0))
        sign[sign == 0] = 1.0 if sign.sum() >= 0 else -1.0  # the majority of the elected signs
        agree = stacked * sign > 0  # [n, ...]
        out[key] = scale * (stacked * agree).sum(0) / agree.sum(0).clamp_min(1)
    return out


def emr_deltas(deltas: Sequence[Mapping[str, torch.Tensor]]) -> tuple[Deltas, list[Deltas], list[float]]:
    """EMR: the unified update, each member's boolean masks and its rescaler (see the module docstring)."""
    unified: Deltas = {}
    masks: list[Deltas] = [{} for _ in deltas]
    before, after = [0.0] * len(deltas), [0.0] * len(deltas)
    for key in deltas[0]:
        stacked = torch.stack([d[key] for d in deltas])  # [n, ...]
        sign = torch.where(stacked.mean(0) > 0, 1.0, -1.0)  # zeros count as negative
        agree = stacked * sign > 0  # [n, ...]
        unified[key] = (stacked.abs() * agree).amax(0) * sign
        for i in range(len(deltas)):
            masks[i][key] = agree[i]
            if stacked[i].numel():
                before[i] += float(stacked[i].abs().mean())
                after[i] += float((unified[key] * agree[i]).abs().mean())
    rescalers = [b / a if a > 0 else 1.0 for b, a in zip(before, after, strict=True)]
    return unified, masks, rescalers


def apply_trigger(unified: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], rescaler: float) -> Deltas:
    """EMR's reconstruction ``lambda_i * (M_i * tau_uni)``."""
    return {key: torch.where(masks[key], u, torch.zeros_like(u)) * rescaler for key, u in unified.items()}


def fidelity(reconstruction: Mapping[str, torch.Tensor], original: Mapping[str, torch.Tensor]) -> float:
    """Cosine of the two updates, each concatenated over its tensors (1 when both are zero, 0 when one is)."""
    x = torch.cat([reconstruction[k].flatten().double() for k in sorted(original)])
    y = torch.cat([original[k].flatten().double() for k in sorted(original)])
    nx, ny = float(x.norm()), float(y.norm())
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return max(-1.0, min(1.0, float(x @ y) / (nx * ny)))


# -- masks as bits ------------------------------------------------------------------------------------
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)
_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.int32)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask of any shape as uint8 [ceil(numel / 8)], flattened in row-major order, first entry in
    the highest bit (numpy's packbits order); the shape is kept elsewhere."""
    flat = mask.flatten().to(torch.int32)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of ``pack_mask``: a boolean tensor of ``shape``."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise ArtifactError(
            f"a packed mask for shape {list(shape)} must be uint8 [{(n + 7) // 8}], not "
            f"{str(packed.dtype).removeprefix('torch.')} {list(packed.shape)}"
        )
    bits = (packed.to(torch.int32).unsqueeze(1) >> _BIT_SHIFTS) & 1  # [B, 8]
    return bits.flatten()[:n].bool().reshape(tuple(shape))


# -- what a member keeps next to the unified artifact ---------------------------------------------------
@dataclass(frozen=True)
class Trigger:
    """ConDU's task trigger: what turns the unified adapter into one member's reconstruction.

    For ``emr``: the member's masks (one boolean tensor per update key), its rescaler, its card and its own
    ``label_features`` and ``prototypes`` (``common``). For task arithmetic and TIES the reconstruction is the
    unified adapter itself: ``masks`` is None, ``card`` None and ``common`` empty."""

    method: str
    rescaler: float
    masks: dict[str, torch.Tensor] | None
    card: AdapterCard | None
    common: dict[str, torch.Tensor]

    def to_bytes(self) -> bytes:
        """One small safetensors file: the masks bit-packed (``mask.{key}``, uint8), ``common.{name}``, and the
        method, rescaler, mask shapes and card as JSON metadata."""
        tensors = {f"common.{k}": v.detach().float().contiguous() for k, v in self.common.items()}
        shapes = {}
        for key, mask in (self.masks or {}).items():
            tensors[f"mask.{key}"] = pack_mask(mask)
            shapes[key] = list(mask.shape)
        meta = {
            "method": self.method,
            "rescaler": self.rescaler,
            "shapes": shapes if self.masks is not None else None,
            "card": self.card.to_json() if self.card is not None else None,
        }
        return bytes(save_tensors(tensors, metadata={TRIGGER_KEY: json.dumps(meta)}))

    @classmethod
    def from_bytes(cls, data: bytes) -> Trigger:
        """Read a trigger; raise ArtifactError, saying why, for anything else."""
        try:
            tensors = load_tensors(data)
            header_size = int.from_bytes(data[:8], "little")
            meta = json.loads(json.loads(data[8 : 8 + header_size])["__metadata__"][TRIGGER_KEY])
            method, rescaler, shapes, card_json = meta["method"], float(meta["rescaler"]), meta["shapes"], meta["card"]
        except Exception as exc:  # safetensors and json raise their own error types for corrupt data
            raise ArtifactError(f"the bytes are not a merge trigger: {exc}") from exc
        if method not in METHODS:
            raise ArtifactError(f"unknown merge method {method!r} in the trigger")
        masks = None
        if shapes is not None:
            masks = {
                key: unpack_mask(tensors.get(f"mask.{key}", torch.empty(0)), shape) for key, shape in shapes.items()
            }
        common = {k.removeprefix("common."): v.float() for k, v in tensors.items() if k.startswith("common.")}
        card = AdapterCard.from_json(card_json) if card_json is not None else None
        return cls(method, rescaler, masks, card, common)


def reconstruct(unified: Adapter, trigger: Trigger) -> Adapter:
    """A member of a merge from the unified adapter and the member's trigger: exactly ``merge``'s reconstruction."""
    if trigger.masks is None or trigger.card is None:
        return unified
    served = unified.deltas()
    if {k: tuple(v.shape) for k, v in served.items()} != {k: tuple(m.shape) for k, m in trigger.masks.items()}:
        raise ArtifactError(
            "the trigger's masks do not match the unified adapter's updates: it belongs to another merge"
        )
    common = dict(trigger.common)
    if "prompt.ctx_init" in unified.tensors:
        common["prompt.ctx_init"] = unified.tensors["prompt.ctx_init"]
    return Adapter.from_deltas(trigger.card, apply_trigger(served, trigger.masks, trigger.rescaler), common)


# -- merging adapters -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemberMerge:
    """One member's side of a merge. ``reconstruction`` is what serves the member after the merge (the
    unified adapter itself for task arithmetic and TIES); ``fidelity`` the cosine of its updates with the
    member's original updates; ``mask_density`` the fraction of update entries its mask keeps (1 without a
    mask); ``trigger`` what to store for it next to the unified artifact."""

    reconstruction: Adapter
    mask_density: float
    rescaler: float
    fidelity: float
    trigger: Trigger


@dataclass(frozen=True)
class Merged:
    """A group's merge: the unified adapter and, per member in the order given, its ``MemberMerge``."""

    method: str
    unified: Adapter
    members: tuple[MemberMerge, ...]


def merge(
    members: Sequence[Adapter],
    method: str,
    *,
    scale: float | None = None,
    density: float | None = None,
    names: Sequence[str] | None = None,
) -> Merged:
    """Merge ``members`` (from their originals) with ``method``, one of ``METHODS``.

    ``scale``: task arithmetic's coefficient (default ``1 / sqrt(n)`` within [0.3, 1]) or TIES's (default 1);
    ``density``: the fraction of each member's entries TIES keeps (default 0.2); ``names``: the members' names,
    for error messages and the unified card. Raise MergeError when the members cannot merge or a setting does
    not apply to the method."""
    names = list(names) if names is not None else [f"adapter {i}" for i in range(len(members))]
    scale, density = _settings(method, len(members), scale, density)
    if len(names) != len(members):
        raise MergeError(f"{len(names)} names for {len(members)} adapters")
    originals = [m.deltas() for m in members]
    _check_mergeable(members, originals, names)
    masks: list[dict[str, torch.Tensor]] | None = None
    if method == "emr":
        unified_deltas, masks, rescalers = emr_deltas(originals)
    elif method == "ties":
        unified_deltas, rescalers = ties_deltas(originals, density, scale), [1.0] * len(members)
    else:
        unified_deltas, rescalers = task_arithmetic_deltas(originals, scale), [1.0] * len(members)

    first = members[0].card
    labels, label_features, prototypes = _union_labels(members)
    training: dict[str, Any] = {
        "merge": method,
        "members": [
            {"name": n, "type": m.card.type, "labels": list(m.card.labels)} for n, m in zip(names, members, strict=True)
        ],
    }
    if method != "emr":
        training["scale"] = scale
    if method == "ties":
        training["density"] = density
    card = AdapterCard(
        type="merged", parts=first.parts, base_model=first.base_model, labels=labels, ctx_init=first.ctx_init,
        training=training,
    )  # fmt: skip
    common = {"label_features": label_features, "prototypes": prototypes}
    if "prompt.ctx_init" in members[0].tensors:
        common["prompt.ctx_init"] = members[0].tensors["prompt.ctx_init"]
    unified = Adapter.from_deltas(card, unified_deltas, common)

    results: list[tuple[Adapter | None, float, float, Trigger]] = []
    for i, member in enumerate(members):
        if masks is None:
            results.append((None, 1.0, fidelity(unified.deltas(), originals[i]), Trigger(method, 1.0, None, None, {})))
            continue
        kept = sum(int(m.sum()) for m in masks[i].values())
        total = sum(m.numel() for m in masks[i].values())
        density_i = kept / total if total else 1.0
        member_card = replace(
            member.card,
            training={**member.card.training, "merge": {"method": method, "group": names, "rescaler": rescalers[i]}},
        )
        own = {"label_features": member.tensors["label_features"], "prototypes": member.tensors["prototypes"]}
        trigger = Trigger(method, rescalers[i], masks[i], member_card, {k: v.clone() for k, v in own.items()})
        recon = reconstruct(unified, trigger)
        results.append((recon, density_i, fidelity(recon.deltas(), originals[i]), trigger))

    metrics = {}
    for i, (_, density_i, fid, _) in enumerate(results):
        metrics[f"member{i}.fidelity"] = fid
        metrics[f"member{i}.rescaler"] = rescalers[i]
        metrics[f"member{i}.mask_density"] = density_i
    unified = Adapter(replace(card, metrics=metrics), unified.tensors)
    out = tuple(
        MemberMerge(recon if recon is not None else unified, density_i, rescalers[i], fid, trigger)
        for i, (recon, density_i, fid, trigger) in enumerate(results)
    )
    return Merged(method, unified, out)


def _settings(method: str, n: int, scale: float | None, density: float | None) -> tuple[float, float]:
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; known: {', '.join(METHODS)}")
    if n == 0:
        raise MergeError("a merge needs at least one adapter")
    if method == "emr" and scale is not None:
        raise MergeError("emr takes no scale: each member has its own rescaler")
    if method != "ties" and density is not None:
        raise MergeError(f"density is TIES's trim fraction; {method} takes none")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise MergeError(f"scale must be a positive number, not {scale}")
    if density is not None and not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], not {density}")
    if scale is None:
        scale = TIES_SCALE if method == "ties" else min(1.0, max(0.3, 1 / math.sqrt(n)))
    return scale, density if density is not None else TIES_DENSITY


def _check_mergeable(members: Sequence[Adapter], deltas: Sequence[Deltas], names: Sequence[str]) -> None:
    """Raise MergeError naming the first difference that keeps ``members`` from merging."""
    first, name0 = members[0], names[0]
    shapes0 = {k: tuple(v.shape) for k, v in deltas[0].items()}
    width0 = first.tensors["label_features"].shape[1]
    for member, d, name in zip(members[1:], deltas[1:], names[1:], strict=True):
        card = member.card
        if card.base_model != first.card.base_model:
            raise MergeError(
                f"{name} was made for base model {card.base_model}, {name0} for {first.card.base_model}: "
                "only adapters of one base model merge"
            )
        if set(card.parts) != set(first.card.parts):
            raise MergeError(f"{name} has parts {list(card.parts)}, {name0} has {list(first.card.parts)}")
        if "prompt" in card.parts and (
            card.ctx_init != first.card.ctx_init
            or not torch.equal(member.tensors["prompt.ctx_init"], first.tensors["prompt.ctx_init"])
        ):
            raise MergeError(
                f"{name}'s prompt context starts from {card.ctx_init!r}, {name0}'s from {first.card.ctx_init!r}: "
                "prompt contexts merge only from the same starting text"
            )
        shapes = {k: tuple(v.shape) for k, v in d.items()}
        if shapes != shapes0:
            diff = sorted(k for k in shapes.keys() | shapes0.keys() if shapes.get(k) != shapes0.get(k))
            show = ", ".join(f"{k}: {list(shapes.get(k) or [])} against {list(shapes0.get(k) or [])}" for k in diff)
            raise MergeError(f"{name}'s updates differ in shape from {name0}'s ({show})")
        if member.tensors["label_features"].shape[1] != width0:
            raise MergeError(
                f"{name}'s label features are {member.tensors['label_features'].shape[1]} wide, {name0}'s {width0}"
            )


def _union_labels(members: Sequence[Adapter]) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor]:
    """The members' labels in order, each once; the first text embedding and the normalized mean prototype."""
    rows: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for member in members:
        features, protos = member.tensors["label_features"], member.tensors["prototypes"]
        for j, label in enumerate(member.card.labels):
            if label in rows:
                rows[label][1].append(protos[j])
            else:
                rows[label] = (features[j], [protos[j]])
    labels = tuple(rows)
    if not labels:
        empty = members[0].tensors["label_features"][:0]
        return labels, empty.clone(), empty.clone()
    label_features = torch.stack([rows[label][0] for label in labels])  # [C, D]
    prototypes = torch.stack(
        [p[0] if len(p) == 1 else F.normalize(torch.stack(p).mean(0), dim=-1) for _, p in rows.values()]
    )  # [C, D]
    return labels, label_features, prototypes
