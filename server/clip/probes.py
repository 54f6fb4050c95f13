"""Activation probes: what the frozen towers keep for a backward pass, counted by running them once.

``ActivationBytes.measure`` runs the vision tower on two images and the text tower on eight prompts
with autograd on, and counts the storages autograd saves (weights left out): per image through the
whole vision tower and through its largest block, and per prompt token through the text tower. The
engine's admission (``server.engine.admission.MemoryModel``) turns these into bytes per request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from server.clip.backbone import Backbone


@contextlib.contextmanager
def _saved_bytes(exclude: set[int]) -> Iterator[dict[int, int]]:
    """Count the storages autograd saves for backward, by address, leaving out ``exclude`` (weights).

    Only for forward passes that are never backpropagated: what is saved is detached, since keeping an
    op's own output would tie it to its graph in a cycle the garbage collector cannot see.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t.detach()

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def _vision_blocks(visual: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks a vision tower runs one after another (empty when its layout is not known)."""
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if resblocks is not None:  # open_clip's VisionTransformer
        return list(resblocks)
    stages = [getattr(visual, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(stage, torch.nn.Sequential) for stage in stages):  # ModifiedResNet: bottlenecks, pool
        return [block for stage in stages for block in stage] + [visual.attnpool]  # type: ignore[union-attr]
    blocks = getattr(getattr(visual, "trunk", None), "blocks", None)  # a timm tower
    return list(blocks) if isinstance(blocks, torch.nn.Sequential | torch.nn.ModuleList) else []


def _vision_saved_bytes(visual: torch.nn.Module, images: torch.Tensor, weights: set[int]) -> tuple[int, int]:
    """Bytes the vision tower saves for backward on ``images``: in all, and the most saved by one block or
    by everything outside the blocks (a ResNet's stem), which is what encoding holds at a time."""
    per_block: list[int] = []
    start: list[int] = []
    with _saved_bytes(weights) as seen:
        hooks = []
        for block in _vision_blocks(visual):
            hooks.append(block.register_forward_pre_hook(lambda *_: start.append(sum(seen.values()))))
            hooks.append(block.register_forward_hook(lambda *_: per_block.append(sum(seen.values()) - start.pop())))
        try:
            visual(images)
        finally:
            for hook in hooks:
                hook.remove()
    total = sum(seen.values())
    return total, max([*per_block, total - sum(per_block)])


@dataclass(frozen=True)
class ActivationBytes:
    """What the backbone keeps for a backward pass, measured by running it once with autograd on."""

    image: float  # one image through the whole vision tower
    image_block: float  # one image through the largest vision block: encoding a view holds about this at a time
    prompt_token: float  # one prompt token through the whole text tower (0: no prompt learning)
    view_pixels: float = 0.0  # one view's pixels: float32 as cropped and normalised, and in the model's dtype

    @classmethod
    def measure(cls, backbone: Backbone) -> ActivationBytes:
        """Run each tower once with autograd on and count what it saves (two images, eight prompts)."""
        model = backbone.model
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        h, w = backbone.image_size
        images = torch.zeros(2, 3, h, w, device=backbone.device, dtype=backbone.dtype, requires_grad=True)
        image, block = _vision_saved_bytes(backbone.visual, images, weights)
        prompt_token = 0.0
        if backbone.prompt_learning_error is None:
            labels = tuple(f"measured label {i}" for i in range(8))
            inputs = backbone.prompt_inputs(labels)
            ctx = inputs.ctx_init[None].clone().requires_grad_(True)  # [1, n_ctx, W]
            with _saved_bytes(weights) as seen:
                backbone.encode_text_with_contexts(ctx, [inputs])
            prompt_token = sum(seen.values()) / (len(labels) * inputs.context_length)
        pixels = 3 * h * w * (2 * 4 + images.element_size())
        return cls(image=image / 2, image_block=block / 2, prompt_token=prompt_token, view_pixels=pixels)
