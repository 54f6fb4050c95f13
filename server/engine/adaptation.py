"""One image, or several stacked, through a test-time method: the pipeline the adaptation lane runs.

Per image: views made on the device from the decoded tensor with the image's own seeded generator,
all images' views encoded in one pass (``Method.encode_views``), the method's ``adapt_batch`` over
every image's own parameters, the blend with the zero-shot answer its options ask for
(``adapters.ensemble``; calibration comes after, in the service), and a report of what it did.
Benchmarks call ``adapt_image`` and ``adapt_images`` directly, exactly as the engine does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from adapters import AdaptInput, Method, MethodOptions
from adapters.descriptions import DescriptionFeatures
from adapters.ensemble import blend
from adapters.views import make_clip_views, make_views, pool_views
from server.clip.backbone import Backbone
from server.engine.work import ImageReport


def image_seed(seed: int, index: int) -> int:
    """The generator seed of image ``index`` of a request: distinct per image, fixed by the request's seed."""
    return (seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1)


@dataclass
class ImageTask:
    """One image to adapt: its decoded tensor, base view, classes and seeded generator."""

    original: torch.Tensor  # [3, H0, W0] uint8; a clip: [T, 3, H0, W0], its frames
    base_view: torch.Tensor  # [3, h, w]; a clip: [T, 3, h, w]
    classes: torch.Tensor  # [C, D] a normal (not inference-mode) tensor
    labels: tuple[str, ...]
    generator: torch.Generator
    stop: Callable[[], bool] = lambda: False
    descriptions: DescriptionFeatures | None = None  # the label set's, when the options use them
    anchors: torch.Tensor | None = None  # [M, D] anchor texts, for the anchor_kl regularizer

    @property
    def is_clip(self) -> bool:
        return self.original.dim() == 4


def adapt_images(
    backbone: Backbone, method: Method[Any], options: MethodOptions, tasks: list[ImageTask]
) -> list[tuple[torch.Tensor, ImageReport]]:
    """Images through a test-time method together: views, one encoder pass, stacked steps, predictions.

    Each image's result is what it gets alone: its views come from its own generator and its
    parameters and loss are its own. Raises ``adapters.base.Stopped`` when every image's ``stop``
    says so between steps.

    Returns:
        per image, the final logits [C] (float32, CPU) and the report.
    """
    started = time.monotonic()
    n_views = options.views
    cfg = backbone.preprocess_cfg
    views: list[torch.Tensor] = []  # per task: [V, 3, h, w] an image's views, or a clip's frames of every view
    groups: list[list[slice] | None] = []  # per clip: the rows each of its views pools
    for t in tasks:
        how = (t.original.to(backbone.device), n_views, backbone.image_size, cfg.mean, cfg.std, t.generator)
        if t.is_clip:
            pixels, rows = make_clip_views(*how, base_views=t.base_view, augmentation=options.augmentation)
            views.append(pixels)
            groups.append(rows)
        else:
            views.append(make_views(*how, base_view=t.base_view, augmentation=options.augmentation))
            groups.append(None)
    encoded = method.encode_views(backbone, views)
    # A clip's view is the mean embedding of its frames; only methods that adapt on view features (not
    # ones that re-run the tower on the views' pixels) are given clips (server.service.video).
    inputs = [
        AdaptInput(
            feats if rows is None else pool_views(feats, rows),
            t.classes,
            backbone.logit_scale,
            t.labels,
            t.generator,
            backbone,
            v if rows is None else None,
            cache if rows is None else {},
            t.stop,
            t.descriptions,
            t.anchors,
        )
        for t, v, rows, (feats, cache) in zip(tasks, views, groups, encoded, strict=True)
    ]
    zero_shot = [inp.zero_shot_logits().detach() for inp in inputs]  # each [V, C]
    results = method.adapt_batch(inputs, options)
    out = []
    for r, zs in zip(results, zero_shot, strict=True):
        logits, extra = r.logits.detach(), r.extra
        if options.ensemble.mode != "off":  # APEX's blend with the zero-shot answer, before calibration
            mixed = blend(zs, logits, options.ensemble)
            logits = mixed.logits
            extra = extra | {
                "ensemble": {"difficulty": mixed.difficulty, "weight": mixed.weight, "divergence": mixed.divergence}
            }
        out.append((logits, zs[0], r, extra))
    backbone.sync()
    seconds = time.monotonic() - started
    return [
        (
            logits.float().cpu(),
            ImageReport(
                zs.float().cpu(), r.steps, n_views, r.selected_views, seconds, r.order, extra, batch_images=len(tasks)
            ),
        )
        for logits, zs, r, extra in out
    ]


def adapt_image(
    backbone: Backbone,
    method: Method[Any],
    options: MethodOptions,
    original: torch.Tensor,
    base_view: torch.Tensor,
    classes: torch.Tensor,
    labels: tuple[str, ...],
    generator: torch.Generator,
) -> tuple[torch.Tensor, ImageReport]:
    """One image through a test-time method (``adapt_images`` of one): the final logits [C] and the report.

    Args:
        original: [3, H0, W0] uint8, the decoded image (views are cropped from it).
        base_view: [3, h, w] its normal preprocessing (view 0).
        classes: [C, D] class features, a normal (not inference-mode) tensor.
        generator: the image's seeded generator; the only source of randomness.
    """
    return adapt_images(backbone, method, options, [ImageTask(original, base_view, classes, labels, generator)])[0]
