"""What a test-time method may ask of the frozen model: the ``Backbone`` protocol.

``server.clip.Backbone`` implements it for open_clip models. A method never reaches into the model's
modules; it calls these, and they never change the model's weights. A backbone that cannot serve a
request (a text tower without a causal mask, a vision tower without attention blocks) raises
``UnsupportedModel`` with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from adapters.lowrank import LoraFactors, LoraTargets
from adapters.prompts import PromptInputs

TPT_CTX_INIT = "a photo of a"  # the prompt context TPT and C-TPT start from


class UnsupportedModel(ValueError):
    """The loaded model cannot run this method (the message says why): the request is refused (422), the
    server carries on. Other errors a method raises are the server's fault (500)."""


class Backbone(Protocol):
    """A loaded, frozen CLIP model as a method sees it."""

    @property
    def device(self) -> torch.device: ...

    @property
    def logit_scale(self) -> float: ...

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images -> [B, D] unit-norm features (float32, on the device)."""
        ...

    # Prompt learning (TPT, C-TPT).
    def prompt_inputs(self, labels: tuple[str, ...], ctx_init: str = TPT_CTX_INIT) -> PromptInputs:
        """The frozen token embeddings of ``"{ctx_init} {label}."`` for each label."""
        ...

    def encode_text_with_contexts(self, ctx: torch.Tensor, inputs: Sequence[PromptInputs]) -> list[torch.Tensor]:
        """R contexts [R, n_ctx, W], each with its own label set's prompts -> R unit-norm [C_r, D] class
        features, differentiable in ``ctx``."""
        ...

    # Low-rank adaptation of the vision tower (TTL).
    def lora_targets(self, n_blocks: int = 3) -> LoraTargets:
        """Where LoRA goes: q and v of the last ``n_blocks`` attention blocks of the vision tower."""
        ...

    def vision_prefix(self, images: torch.Tensor, targets: LoraTargets | None = None) -> torch.Tensor:
        """The frozen vision tower up to the first adapted block, for ``images`` [N, 3, H, W]."""
        ...

    def vision_suffix(self, prefix: torch.Tensor, lora: LoraFactors) -> torch.Tensor:
        """Unit-norm image features [N, D] (or [R, N, D] stacked) with ``lora`` on the adapted blocks,
        differentiable in its factors."""
        ...
