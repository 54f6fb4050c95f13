"""What adaptation work costs, in seconds and in bytes, for the engine's adaptation lane.

Seconds: a method states the forward passes adapting one image takes (``Method.cost``: image passes
and prompt passes, a backward pass counting as two); ``CostModel.measure`` times what one image and
one prompt take to encode, once at start-up. Their product is corrected per method by a moving average of what
batches really took against what was estimated (stacking, caches and the shared prompt prefix make
real work cheaper than the plain count). Making the views is priced too where it is not negligible:
an AugMix view runs a chain of PIL operations on the CPU per crop, so ``measure`` also times making
views with and without AugMix, and an ``augmentation: "augmix"`` request pays the difference per view
(otherwise the moving correction, learnt per method, would mix both kinds of request). The lane admits
work against a budget in seconds.

Bytes: ``server.clip.probes.ActivationBytes.measure`` counts, once at start-up, the activations autograd keeps for a
backward pass of one image through the vision tower and of one prompt token through the text
tower. An image's adaptation peaks either while its views are made and encoded (their pixels and one
block's activations at a time) or, later, with what its method keeps for a step (``Cost.kept_images``,
``Cost.kept_prompts``). The lane stacks images within a budget in bytes and serves zero-shot an image
that does not fit alone. On a GPU the estimate is corrected by the peak the stacked batches reached.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from adapters import Method, MethodOptions, UnsupportedModel
from adapters.backbone import TPT_CTX_INIT
from adapters.views import make_views
from server.clip.backbone import Backbone
from server.clip.probes import ActivationBytes


class CostModel:
    """Seconds to adapt images with a method, learnt from the batches the engine runs."""

    def __init__(self, image_s: float = 0.0, prompt_s: float = 0.0, augmix_view_s: float = 0.0) -> None:
        self.image_s = image_s  # seconds to encode one image, and one prompt (0 until measured: all free)
        self.prompt_s = prompt_s
        self.augmix_view_s = augmix_view_s  # what making an AugMix view costs beyond a crop with a flip
        self._correction: dict[str, float] = {}

    @classmethod
    def measure(cls, backbone: Backbone, n: int = 8) -> CostModel:
        """Time an ``n``-image and an ``n``-prompt encode on a warmed-up backbone: seconds per image, per prompt;
        and ``n`` views made with AugMix against ``n`` crops with flips: the extra seconds per AugMix view."""
        h, w = backbone.image_size
        started = time.perf_counter()
        backbone.encode_images(torch.zeros(n, 3, h, w))
        backbone.sync()
        image_s = (time.perf_counter() - started) / n
        started = time.perf_counter()
        backbone.encode_prompts([f"a photo of a measured prompt number {i}." for i in range(n)])
        backbone.sync()
        prompt_s = (time.perf_counter() - started) / n
        return cls(image_s, prompt_s, augmix_view_s(backbone, n))

    def estimate_s(self, method: Method[Any], options: MethodOptions, n_images: int, n_classes: int) -> float:
        """Estimated seconds to adapt ``n_images`` images with ``method`` against ``n_classes`` classes."""
        cost = method.cost(options, n_classes)
        seconds = cost.image_passes * self.image_s + cost.prompt_passes * self.prompt_s
        if options.augmentation == "augmix":  # every view but the image itself is mixed
            seconds += (options.views - 1) * self.augmix_view_s
        return n_images * seconds * self._correction.get(method.name, 1.0)

    def in_images(self, method: Method[Any], options: MethodOptions, n_classes: int) -> float:
        """What adapting one image with ``method`` costs, counted in images encoded once (a zero-shot image): the
        weight of an adapted image against the rate limits. At least 1; before the timings are measured, the
        method's forward passes (a prompt pass counted as an image pass)."""
        if self.image_s <= 0:
            cost = method.cost(options, n_classes)
            return max(1.0, cost.image_passes + cost.prompt_passes)
        return max(1.0, self.estimate_s(method, options, 1, n_classes) / self.image_s)

    def learn(self, method: str, estimated_s: float, actual_s: float) -> None:
        """Move the method's correction towards what a batch estimated at ``estimated_s`` really took."""
        if estimated_s <= 0:
            return
        old = self._correction.get(method, 1.0)
        ratio = min(10.0, max(0.1, actual_s / estimated_s * old))
        self._correction[method] = 0.7 * old + 0.3 * ratio


def augmix_view_s(backbone: Backbone, n: int = 8) -> float:
    """Seconds that making one AugMix view takes beyond a crop with a flip, at the model's input size (>= 0)."""
    h, w = backbone.image_size
    image = torch.rand(3, 2 * h, 2 * w, generator=torch.Generator().manual_seed(0))
    base = torch.zeros(3, h, w)
    mean, std = backbone.preprocess_cfg.mean, backbone.preprocess_cfg.std
    took = {}
    for augmentation in ("crop_flip", "augmix"):
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        make_views(image, n + 1, (h, w), mean, std, generator, base, augmentation)
        took[augmentation] = time.perf_counter() - started
    return max(0.0, took["augmix"] - took["crop_flip"]) / n


# The text tower's backward pass holds the gradients of a layer's activations while earlier layers' are
# still saved: its peak was 1.13-1.16x the saved activations (benchmarks/memory_estimate.py, TPT, C = 100
# to 1000, ViT-B-32 on the CPU).
BACKWARD_WORKSPACE = 1.15


class MemoryModel:
    """Bytes adapting one image takes at its peak, and the lane's budget for a stacked batch."""

    def __init__(self, activations: ActivationBytes, budget_bytes: int):
        self.activations = activations
        self.budget_bytes = budget_bytes
        self._correction: dict[str, float] = {}

    def image_bytes(
        self, backbone: Backbone, method: Method[Any], options: MethodOptions, labels: tuple[str, ...]
    ) -> float:
        """Estimated bytes one image of ``labels`` holds while ``method`` adapts it."""
        cost = method.cost(options, len(labels))
        a = self.activations
        encoding = options.views * (a.view_pixels + a.image_block)  # freed before the first step
        kept = cost.kept_images * a.image
        if cost.kept_prompts and a.prompt_token:
            try:
                tokens = backbone.prompt_inputs(labels, options.ctx_init or TPT_CTX_INIT).context_length
            except UnsupportedModel:  # prompts this model cannot take: the method reports it when it runs
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
    with contextlib.suppress(OSError, ValueError), Path("/proc/meminfo").open() as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


T = TypeVar("T")


def stack_within(
    items: Sequence[T], needs: Sequence[float], budget: float, max_items: int
) -> tuple[list[list[T]], list[T]]:
    """Split ``items`` in order into batches of at most ``max_items`` whose ``needs`` (bytes, per item) sum
    within ``budget``; and the items that do not fit alone."""
    batches: list[list[T]] = [[]]
    too_big: list[T] = []
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
