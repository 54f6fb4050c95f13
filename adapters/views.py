"""Augmented views of one image, made on the device in one batched op from a per-request generator.

Follows TPT (Shu et al., NeurIPS 2022, https://arxiv.org/abs/2209.07511; azshue/TPT
``data/datautils.py: AugMixAugmenter``) with AugMix off, as TPT runs the ImageNet family: view 0 is
the normal preprocessing of the image (the base view), and every other view is
``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bilinear)`` then
``RandomHorizontalFlip(p=0.5)`` of the original-resolution image, then normalised. TPT's C-TPT, TTL,
TPS, ZERO and MTA forks use the same views.

How ours differs:

- Crop boxes and flips are drawn exactly as torchvision draws them (``RandomResizedCrop.get_params``:
  10 tries, then the central fallback; then one ``rand() < 0.5`` per flip, view by view), but from
  the request's ``torch.Generator`` instead of the global one, so a request is reproducible amid
  concurrent traffic. Seeding the generator with ``s`` gives the boxes torchvision would draw after
  ``torch.manual_seed(s)``.
- TPT crops and resizes PIL images, whose bilinear filter widens (antialiases) when it shrinks. We
  resize tensors with plain bilinear interpolation (torchvision's ``antialias=False``), all views in
  one gather, because a per-view antialias filter has a different width per view and does not batch.
  Crops smaller than the output (upscaled) come out as PIL's do, up to its rounding; larger crops
  are shrunk without the wider filter, so they are a little sharper and more aliased than TPT's.
- A uint8 image is resized in float and rounded back to the uint8 grid before scaling to [0, 1], as
  torchvision's generic path does for uint8 tensors and as PIL's uint8 output is; a float image in
  [0, 1] is not rounded.

``augmentation="augmix"`` turns TPT's AugMix on: each crop is then mixed with three chains of PIL
operations (``adapters.augmix``), as the official TPT does on its fine-grained sets.

A video's views (``make_clip_views``) are temporal subsets of its frames under one spatial augmentation
each, pooled by the mean of their frames' embeddings (``pool_views``): not in any of the papers, which
classify images; the spatial part is exactly the image's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from adapters.augmix import Plan, TorchDraws, augmix_view, sample_plan

AUGMENTATIONS = ("crop_flip", "augmix")
SCALE = (0.08, 1.0)  # RandomResizedCrop's default area range
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range
FLIP_P = 0.5


def sample_boxes(
    height: int,
    width: int,
    n: int,
    generator: torch.Generator,
    scale: tuple[float, float] = SCALE,
    ratio: tuple[float, float] = RATIO,
    flip_p: float = FLIP_P,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` crop boxes and flips as torchvision's RandomResizedCrop + RandomHorizontalFlip would.

    Returns:
        boxes: [n, 4] int64 rows (top, left, height, width), as ``get_params`` returns them.
        flips: [n] bool.
    """
    device = generator.device
    area = height * width
    # torchvision takes the log in float32 and hands the bounds to uniform_ as Python floats.
    log_ratio = torch.log(torch.tensor(ratio))
    lo, hi = float(log_ratio[0]), float(log_ratio[1])
    boxes, flips = [], []
    for _ in range(n):
        for _ in range(10):
            target_area = area * torch.empty(1, device=device).uniform_(scale[0], scale[1], generator=generator).item()
            aspect = torch.exp(torch.empty(1, device=device).uniform_(lo, hi, generator=generator)).item()
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, size=(1,), device=device, generator=generator).item())
                j = int(torch.randint(0, width - w + 1, size=(1,), device=device, generator=generator).item())
                break
        else:  # central fallback, as torchvision's
            in_ratio = float(width) / float(height)
            if in_ratio < min(ratio):
                w = width
                h = round(w / min(ratio))
            elif in_ratio > max(ratio):
                h = height
                w = round(h * max(ratio))
            else:
                w, h = width, height
            i, j = (height - h) // 2, (width - w) // 2
        boxes.append((i, j, h, w))
        # RandomHorizontalFlip draws after the crop of the same view.
        flips.append(bool(torch.rand(1, device=device, generator=generator).item() < flip_p))
    return torch.tensor(boxes, dtype=torch.long).view(n, 4), torch.tensor(flips, dtype=torch.bool)


def _axis(start: torch.Tensor, length: torch.Tensor, out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights along one axis for bilinear resize of [start, start+length) to ``out``.

    The formulas are PyTorch's ``upsample_bilinear2d`` with ``align_corners=False`` (float32 scale
    ``length / out``, source ``scale * (dst + 0.5) - 0.5`` clamped at 0, the upper neighbour clamped to
    the crop's last pixel), so the result equals ``interpolate`` on the cropped tensor.
    """
    scale = length.to(torch.float32) / out  # [V]
    dst = torch.arange(out, device=start.device, dtype=torch.float32) + 0.5  # [out]
    src = (scale[:, None] * dst - 0.5).clamp_min(0.0)  # [V, out]
    i0 = torch.minimum(src.floor().long(), length[:, None] - 1)  # [V, out]
    lam1 = (src - i0).clamp(0.0, 1.0)  # [V, out]
    i1 = i0 + (i0 < length[:, None] - 1).long()  # [V, out]
    return start[:, None] + i0, start[:, None] + i1, lam1


def resize_crops(
    image: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], flips: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop each box of ``image`` and resize it to ``size`` with bilinear interpolation, all at once.

    Equals torchvision's ``resized_crop(image, *box, size, BILINEAR, antialias=False)`` per box (and a
    horizontal flip where ``flips``), up to float rounding. We gather the four neighbours with
    PyTorch's own index and weight formulas rather than use ``torchvision.ops.roi_align``: with
    ``aligned=True`` roi_align samples the same points, but near the crop border it reads pixels
    outside the crop where ``interpolate`` clamps to the crop's edge (every upscaled crop differs on
    its border rows), and it averages several samples per bin unless ``sampling_ratio=1``.

    Args:
        image: [3, H, W] uint8 (0..255) or float (0..1).
        boxes: [V, 4] int rows (top, left, height, width), inside the image.
        size: output (h, w).
        flips: [V] bool, views to mirror left-right.
    Returns:
        [V, 3, h, w] float32 in [0, 1].
    """
    out_h, out_w = size
    device = image.device
    n = boxes.shape[0]
    width = image.shape[-1]
    flat = image.reshape(image.shape[0], -1)  # [3, H*W], still uint8: a large photo is not copied to float
    boxes = boxes.to(device)
    y0, y1, wy = _axis(boxes[:, 0], boxes[:, 2], out_h)  # [V, h] each
    x0, x1, wx = _axis(boxes[:, 1], boxes[:, 3], out_w)  # [V, w] each
    if flips is not None:
        # Mirroring the output is reading the columns in reverse order: free, and exact.
        f = flips.to(device)[:, None]
        x0, x1, wx = (torch.where(f, t.flip(-1), t) for t in (x0, x1, wx))

    def gather(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # index_select on flat indices: about 2.5x faster on CPU than img[:, y, x] advanced indexing.
        idx = (y[:, :, None] * width + x[:, None, :]).view(-1)  # [V*h*w]
        return flat.index_select(1, idx).view(-1, n, out_h, out_w).to(torch.float32)  # [3, V, h, w]

    wx1, wx0 = wx[:, None, :], 1.0 - wx[:, None, :]  # [V, 1, w]
    wy1, wy0 = wy[:, :, None], 1.0 - wy[:, :, None]  # [V, h, 1]
    # PyTorch's kernel association, h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11), so a
    # uint8 image rounds to the same levels as interpolate-then-round; in place to spare the allocator.
    top = gather(y0, x0).mul_(wx0).add_(gather(y0, x1).mul_(wx1))  # [3, V, h, w]
    bottom = gather(y1, x0).mul_(wx0).add_(gather(y1, x1).mul_(wx1))  # [3, V, h, w]
    out = top.mul_(wy0).add_(bottom.mul_(wy1)).transpose(0, 1)  # [V, 3, h, w]
    if image.dtype == torch.uint8:
        out = out.round().div_(255.0)
    return out.contiguous()


def make_views(
    image: torch.Tensor,
    n_views: int,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    base_view: torch.Tensor,
    augmentation: str = "crop_flip",
) -> torch.Tensor:
    """TPT's views of one image: the base view, then ``n_views - 1`` random resized crops with flips.

    Args:
        image: [3, H, W] the decoded image at its original resolution, uint8 or float in [0, 1].
        n_views: total views, the base view included (TPT: 64).
        size: (h, w) of every view, the model's input size.
        mean, std: the model's normalisation, per channel.
        generator: the request's seeded generator; the only source of randomness.
        base_view: [3, h, w] the server's normal preprocessing of the image, already normalised.
        augmentation: "crop_flip", or "augmix" to mix each crop with AugMix chains (``adapters.augmix``).
    Returns:
        [n_views, 3, h, w] float32 on ``image.device``; row 0 is ``base_view``.
    """
    if n_views < 1:
        raise ValueError(f"n_views must be at least 1, got {n_views}")
    if tuple(base_view.shape) != (image.shape[0], *size):
        raise ValueError(f"base_view has shape {tuple(base_view.shape)}, expected {(image.shape[0], *size)}")
    device = image.device
    base = base_view.to(device, torch.float32)[None]  # [1, 3, h, w]
    if n_views == 1:
        return base
    _check_augmentation(augmentation)
    boxes, flips = sample_boxes(int(image.shape[-2]), int(image.shape[-1]), n_views - 1, generator)
    plans = _plans(n_views - 1, generator) if augmentation == "augmix" else None
    crops = resize_crops(image, boxes, size, flips)  # [n-1, 3, h, w]
    return torch.cat([base, _finish(crops, plans, mean, std)])  # [n, 3, h, w]


def _check_augmentation(augmentation: str) -> None:
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}")


def _plans(n: int, generator: torch.Generator) -> list[Plan]:
    draws = TorchDraws(generator)
    return [sample_plan(draws) for _ in range(n)]


def _finish(
    crops: torch.Tensor, plans: Sequence[Plan] | None, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """[n, 3, h, w] crops in [0, 1] -> normalised views, each mixed by its AugMix plan when ``plans``."""
    device = crops.device
    if plans is not None:
        # The PIL operations read uint8 crops, as TPT's crops are uint8 PIL images; they run on the CPU.
        pixels = crops.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu()  # [n, 3, h, w]
        mixed = [augmix_view(crop, plan, mean, std) for crop, plan in zip(pixels, plans, strict=True)]
        return torch.stack(mixed).to(device)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return crops.sub_(m).div_(s)


def clip_view_frames(n_frames: int) -> int:
    """Frames in each augmented view of a clip of ``n_frames``: a random half, rounded up."""
    return (n_frames + 1) // 2


def make_clip_views(
    frames: torch.Tensor,
    n_views: int,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    base_views: torch.Tensor,
    augmentation: str = "crop_flip",
) -> tuple[torch.Tensor, list[slice]]:
    """Views of a clip: the base views of every frame, then ``n_views - 1`` spatio-temporal views.

    Each augmented view is a random temporal subset of ``clip_view_frames(T)`` frames (in time order)
    under one spatial augmentation, the same crop, flip and AugMix chains for all its frames, as a
    clip is augmented in video recognition. A view's feature is the mean of its frames' (``pool_views``).
    The crops and AugMix plans are drawn first, in the order ``make_views`` draws them for one image,
    then the subsets: T identical frames give the single image's views.

    Args:
        frames: [T, 3, H, W] the decoded frames at their original resolution, uint8 or float in [0, 1].
        base_views: [T, 3, h, w] each frame's normal preprocessing, already normalised.
    Returns:
        pixels [T + (n_views - 1) * k, 3, h, w] float32 on ``frames.device``, and per view the rows of
        ``pixels`` it pools (view 0: the T base views).
    """
    if n_views < 1:
        raise ValueError(f"n_views must be at least 1, got {n_views}")
    _check_augmentation(augmentation)
    n_frames, height, width = int(frames.shape[0]), int(frames.shape[-2]), int(frames.shape[-1])
    k = clip_view_frames(n_frames)
    device = frames.device
    n_aug = n_views - 1
    boxes, flips = sample_boxes(height, width, n_aug, generator)
    plans = _plans(n_aug, generator) if augmentation == "augmix" else None
    subsets = [
        torch.randperm(n_frames, generator=generator, device=generator.device)[:k].sort().values.tolist()
        for _ in range(n_aug)
    ]
    base = base_views.to(device, torch.float32)  # [T, 3, h, w]
    if n_aug == 0:
        return base, [slice(0, n_frames)]
    # Crop each frame with the boxes of the views that hold it, one batched gather per frame.
    crops = torch.empty(n_aug, k, 3, *size, device=device)  # [V-1, k, 3, h, w]
    for t in range(n_frames):
        where = [(v, subset.index(t)) for v, subset in enumerate(subsets) if t in subset]
        if where:
            views = torch.tensor([v for v, _ in where])
            slots = torch.tensor([j for _, j in where])
            crops[views, slots] = resize_crops(frames[t], boxes[views], size, flips[views])
    flat_plans = [plan for plan in plans for _ in range(k)] if plans is not None else None
    augmented = _finish(crops.view(n_aug * k, 3, *size), flat_plans, mean, std)  # [(V-1) k, 3, h, w]
    pixels = torch.cat([base, augmented])  # [T + (V-1) k, 3, h, w]
    groups = [slice(0, n_frames)] + [slice(n_frames + v * k, n_frames + (v + 1) * k) for v in range(n_aug)]
    return pixels, groups


def pool_views(features: torch.Tensor, groups: Sequence[slice]) -> torch.Tensor:
    """[F, D] unit-norm frame features -> [len(groups), D]: each group's mean embedding, renormalised."""
    pooled = torch.stack([features[g].mean(0) for g in groups])  # [V, D]
    return torch.nn.functional.normalize(pooled, dim=-1)
