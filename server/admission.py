"""What adaptation work costs, in seconds and in bytes, for the engine's adaptation lane.

Seconds: a method states the forward passes adapting one image takes (``Method.cost``: image passes
and prompt passes, a backward pass counting as two); the backbone's warm-up measured what one image
and one prompt take to encode. Their product is corrected per method by a moving average of what
batches really took against what was estimated (stacking, caches and the shared prompt prefix make
real work cheaper than the plain count). The lane admits work against a budget in seconds.

Bytes: ``ActivationBytes.measure`` counts, once at start-up, the activations autograd keeps for a
backward pass of one image through the vision tower and of one prompt token through the text
tower. An image's adaptation peaks either while its views are made and encoded (their pixels and one
block's activations at a time) or, later, with what its method keeps for a step (``Cost.kept_images``,
``Cost.kept_prompts``). The lane stacks images within a budget in bytes and serves zero-shot an image
that does not fit alone. On a GPU the estimate is corrected by the peak the stacked batches reached.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adapters import Method, get_method
from server.backbone import Backbone


class CostModel:
    """Seconds to adapt images with a method, learnt from the batches the engine runs."""

    def __init__(self) -> None:
        self._correction: dict[str, float] = {}

    def estimate_s(self, backbone: Backbone | None, method: str, options: Any, n_images: int, n_classes: int) -> float:
        """Estimated seconds to adapt ``n_images`` images with ``method`` against ``n_classes`` classes."""
        if backbone is None:
            return 0.0
        cost = get_method(method).cost(options, n_classes)
        seconds = cost.image_passes * backbone.image_s + cost.prompt_passes * backbone.prompt_s
        return n_images * seconds * self._correction.get(method, 1.0)

    def learn(self, method: str, estimated_s: float, actual_s: float) -> None:
        """Move the method's correction towards what a batch estimated at ``estimated_s`` really took."""
        if estimated_s <= 0:
            return
        old = self._correction.get(method, 1.0)
        ratio = min(10.0, max(0.1, actual_s / estimated_s * old))
        self._correction[method] = 0.7 * old + 0.3 * ratio


# The text tower's backward pass holds the gradients of a layer's activations while earlier layers' are
# still saved: its peak was 1.13-1.16x the saved activations (benchmarks/memory_estimate.py, TPT, C = 100
# to 1000, ViT-B-32 on the CPU).
BACKWARD_WORKSPACE = 1.15


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
    return total, max(per_block + [total - sum(per_block)])


@dataclass(frozen=True)
class ActivationBytes:
    """What the backbone keeps for a backward pass, measured by running it once with autograd on."""

    image: float  # one image through the whole vision tower
    image_block: float  # one image through the largest vision block: encoding a view holds about this at a time
    prompt_token: float  # one prompt token through the whole text tower (0: no prompt learning)
    view_pixels: float = 0.0  # one view's pixels: float32 as cropped and normalised, and in the model's dtype

    @classmethod
    def measure(cls, backbone: Backbone) -> ActivationBytes:
        model = backbone.model
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        h, w = backbone.image_size
        images = torch.zeros(2, 3, h, w, device=backbone.device, dtype=backbone.dtype, requires_grad=True)
        image, block = _vision_saved_bytes(model.visual, images, weights)
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


class MemoryModel:
    """Bytes adapting one image takes at its peak, and the lane's budget for a stacked batch."""

    def __init__(self, activations: ActivationBytes, budget_bytes: int):
        self.activations = activations
        self.budget_bytes = budget_bytes
        self._correction: dict[str, float] = {}

    def image_bytes(self, backbone: Backbone, method: Method, options: Any, labels: tuple[str, ...]) -> float:
        """Estimated bytes one image of ``labels`` holds while ``method`` adapts it."""
        cost = method.cost(options, len(labels))
        a = self.activations
        encoding = method.n_views(options) * (a.view_pixels + a.image_block)  # freed before the first step
        kept = cost.kept_images * a.image
        if cost.kept_prompts and a.prompt_token:
            try:
                tokens = backbone.prompt_inputs(labels, getattr(options, "ctx_init", "a photo of a")).context_length
            except ValueError:  # prompts this model cannot take: the method reports it when it runs
                tokens = 0
            kept += cost.kept_prompts * tokens * a.prompt_token * BACKWARD_WORKSPACE
        return max(encoding, kept) * self._correction.get(method.name, 1.0)

    def learn(self, method: str, estimated: float, measured: float) -> None:
        """Move the method's correction towards the peak a batch estimated at ``estimated`` bytes reached."""
        if estimated <= 0 or measured <= 0:
            return
        old = self._correction.get(method, 1.0)
        ratio = min(4.0, max(0.25, measured / estimated * old))
        self._correction[method] = 0.7 * old + 0.3 * ratio


def default_memory_budget(device: torch.device) -> int:
    """Half the memory free now: on a GPU after the model is loaded, on the CPU what the OS has available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def stack_within(items: Sequence[Any], needs: Sequence[float], budget: float, max_items: int
                 ) -> tuple[list[list[Any]], list[Any]]:
    """Split ``items`` in order into batches of at most ``max_items`` whose ``needs`` (bytes, per item) sum
    within ``budget``; and the items that do not fit alone."""
    batches: list[list[Any]] = [[]]
    too_big: list[Any] = []
    held = 0.0
    for item, need in zip(items, needs, strict=True):
        if need > budget:
            too_big.append(item)
            continue
        if batches[-1] and (len(batches[-1]) >= max_items or held + need > budget):
            batches.append([])
            held = 0.0
        batches[-1].append(item)
        held += need
    return [b for b in batches if b], too_big


@contextlib.contextmanager
def gpu_peak(device: torch.device) -> Iterator[dict[str, int]]:
    """On a GPU, fill the yielded dict with ``before`` (the peak since the last reset, which this resets) and
    ``rise`` (the most bytes the block allocated beyond what was held when it began); empty elsewhere."""
    peak: dict[str, int] = {}
    if device.type != "cuda":
        yield peak
        return
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device)
    before = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield peak
    torch.cuda.synchronize(device)
    peak.update(before=before, rise=torch.cuda.max_memory_allocated(device) - held)
