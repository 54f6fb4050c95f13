"""The low-rank (LoRA) factors a test-time method trains, and where in a vision tower they go.

Data types only: ``LoraTargets`` is what a backbone reports (``Backbone.lora_targets``), ``LoraFactors``
is one request's trainable A and B per target (or R requests' stacked), which the backbone runs through
its adapted blocks without modifying them (``Backbone.vision_suffix``). TTL (adapters/ttl.py) uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

RESNET_POOL = -1  # LoraTarget.block of the ResNet tower's attention pool


@dataclass(frozen=True)
class LoraTarget:
    """One adapted projection: y = x W^T + b + (alpha / r) * x A^T B^T."""

    name: str  # e.g. "transformer.resblocks.9.attn.q", "attnpool.v_proj"
    block: int  # resblock index in the vision transformer; RESNET_POOL for the attention pool
    proj: str  # "q" or "v"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LoraTargets:
    """Where TTL's LoRA goes in one model's vision tower, in a fixed order (block, then q before v)."""

    tower: str  # "vit" or "resnet"
    blocks: tuple[int, ...]  # the adapted resblocks, ascending; () for the ResNet tower
    targets: tuple[LoraTarget, ...]

    @property
    def first_block(self) -> int:
        """Index of the first adapted resblock: the prefix runs the blocks before it."""
        return self.blocks[0] if self.blocks else RESNET_POOL

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(eq=False)
class LoraFactors:
    """One request's (or R stacked requests') LoRA factors, float32, one A and one B per target.

    A is [r, in] and B is [out, r] (PEFT's ``lora_A.weight`` / ``lora_B.weight`` layout), or
    [R, r, in] and [R, out, r] when R requests are stacked. delta_W = (alpha / r) * B @ A.
    """

    targets: LoraTargets
    a: tuple[torch.Tensor, ...]
    b: tuple[torch.Tensor, ...]
    alpha: float = 32.0

    def __post_init__(self) -> None:
        if not (len(self.a) == len(self.b) == len(self.targets)):
            raise ValueError(
                f"{len(self.targets)} targets need as many A and B factors, got {len(self.a)} and {len(self.b)}"
            )
        lead = tuple(self.a[0].shape[:-2])
        if len(lead) > 1:
            raise ValueError(
                f"LoRA factors take at most one leading (request) axis, got A of shape {tuple(self.a[0].shape)}"
            )
        for t, a, b in zip(self.targets.targets, self.a, self.b, strict=True):
            want_a, want_b = (*lead, self.rank, t.in_features), (*lead, t.out_features, self.rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(f"{t.name}: A {tuple(a.shape)} and B {tuple(b.shape)}, expected {want_a} and {want_b}")

    @property
    def rank(self) -> int:
        return int(self.a[0].shape[-2])

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank  # PEFT's lora_alpha / r (TTL: 32 / 16 = 2)

    @property
    def stacked(self) -> bool:
        return self.a[0].dim() == 3

    def parameters(self) -> list[torch.Tensor]:
        """The tensors an optimizer trains: A and B of each target, in target order."""
        return [t for pair in zip(self.a, self.b, strict=True) for t in pair]

    @classmethod
    def init(
        cls,
        targets: LoraTargets,
        rank: int = 16,
        alpha: float = 32.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> LoraFactors:
        """Fresh trainable factors: A xavier-normal, B zero, so the adapted model starts as the frozen one.

        TTL's code builds PEFT LoRA layers (A kaiming-uniform, B zero), then re-draws each q/v
        ``lora_A`` with ``xavier_normal_`` from the global RNG once, when the model is built, and
        resets every image to that same A. Ours draws A per request from the request's generator
        (targets in order, on the generator's device, then moved to ``device``): the same seed gives
        the same A; a caller that wants TTL's one-A-for-all-images passes a generator with a fixed seed.
        """
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        a, b = [], []
        for t in targets.targets:
            draw = torch.empty(rank, t.in_features, device=gen_device)  # [r, in]
            torch.nn.init.xavier_normal_(draw, generator=generator)
            a.append(draw.to(device).requires_grad_(True))
            b.append(torch.zeros(t.out_features, rank, device=device, requires_grad=True))  # [out, r]
        return cls(targets, tuple(a), tuple(b), float(alpha))

    @classmethod
    def frozen(cls, targets: LoraTargets, device: torch.device | str | None = None) -> LoraFactors:
        """Rank-1 zero factors: the suffix they give is the frozen tower's (no random draw, no gradient)."""
        a = tuple(torch.zeros(1, t.in_features, device=device) for t in targets.targets)
        b = tuple(torch.zeros(t.out_features, 1, device=device) for t in targets.targets)
        return cls(targets, a, b, 1.0)

    @classmethod
    def stack(cls, factors: Sequence[LoraFactors]) -> LoraFactors:
        """R requests' factors as one [R, ...] set; differentiable, so each request's leaves get its gradient."""
        first = factors[0]
        for f in factors:
            if f.targets != first.targets or f.alpha != first.alpha or f.rank != first.rank or f.stacked:
                raise ValueError("only unstacked factors with the same targets, rank and alpha can be stacked")
        a = tuple(torch.stack(ts) for ts in zip(*(f.a for f in factors), strict=True))  # each [R, r, in]
        b = tuple(torch.stack(ts) for ts in zip(*(f.b for f in factors), strict=True))  # each [R, out, r]
        return cls(first.targets, a, b, first.alpha)
