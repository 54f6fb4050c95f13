"""Moving shapes: short synthetic videos of the demo model's classes, deterministic from a seed.

Each video shows one object of one (colour, shape) class of ``synthetic.CLASS_NAMES`` (seen
compositions only) on one of the training backgrounds, moving in a straight line across T frames
and bouncing off the borders, rendered as ``synthetic.render`` renders a still (supersampled,
box-filtered, on the 8-bit grid). A variant then corrupts the frames:

- ``clean``: the frames as rendered;
- ``noise``: independent Gaussian noise per frame (the shift suite's ``gaussian_noise``, severity 3);
- ``dropout``: half the frames, chosen per video, replaced by frames of another class's object
  (a passer-by) under severity-5 noise: mean pooling must outvote them, max pooling is pulled by them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks._lib import shifts, synthetic

VARIANTS = ("clean", "noise", "dropout")


def _frames(cls: int, n_frames: int, gen: torch.Generator, background: int, supersample: int = 2) -> torch.Tensor:
    """[T, 3, 64, 64] in [0, 1]: one object of class ``cls`` moving across ``background``."""
    res = synthetic.IMAGE_SIZE * supersample
    colour, shape = cls // len(synthetic.SHAPES), cls % len(synthetic.SHAPES)
    size = int(torch.randint(0, 2, (1,), generator=gen))
    radius = list(synthetic.SIZES.values())[size] * (0.9 + 0.2 * float(torch.rand(1, generator=gen)))
    rgb = torch.tensor(synthetic.COLOURS[synthetic.COLOUR_NAMES[colour]])
    rgb = (rgb + 0.06 * (torch.rand(3, generator=gen) - 0.5)).clamp(0, 1)
    rot = (float(torch.rand(1, generator=gen)) - 0.5) * (math.pi / 9)
    grey = synthetic.render_background(torch.tensor([background]), gen, res)  # [1, res, res]
    lo, hi = radius + 0.02, 1 - radius - 0.02
    start = lo + (hi - lo) * torch.rand(2, generator=gen)  # x, y
    angle = 2 * math.pi * float(torch.rand(1, generator=gen))
    velocity = 0.06 * torch.tensor([math.cos(angle), math.sin(angle)])  # of the side per frame
    centres = []
    for t in range(n_frames):
        # Bounce: reflect the unbounded path into [lo, hi].
        p = start - lo + t * velocity
        span = hi - lo
        p = torch.remainder(p, 2 * span)
        centres.append(lo + torch.where(p > span, 2 * span - p, p))
    centre = torch.stack(centres)  # [T, 2]
    masks = synthetic.object_masks(
        torch.full((n_frames,), shape), centre, torch.full((n_frames,), radius), torch.full((n_frames,), rot), res
    )  # [T, res, res]
    bg = F.avg_pool2d((grey * (1 - masks)).unsqueeze(1), supersample)  # [T, 1, 64, 64]
    cover = F.avg_pool2d(masks.unsqueeze(1), supersample)  # [T, 1, 64, 64]
    frames = bg + rgb.view(1, 3, 1, 1) * cover
    return torch.round(frames.clamp(0, 1) * 255) / 255


def make_videos(variant: str, n: int, n_frames: int = 8, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``n`` videos of a variant: each [T, 3, 64, 64] in [0, 1], and their labels [n]."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    classes = torch.tensor(synthetic.SEEN)
    labels = classes[torch.randint(0, len(classes), (n,), generator=gen)]
    videos = []
    for i in range(n):
        background = int(torch.randint(0, len(synthetic.BACKGROUNDS), (1,), generator=gen))
        frames = _frames(int(labels[i]), n_frames, gen, background)
        if variant == "dropout":
            other = int(classes[torch.randint(0, len(classes), (1,), generator=gen)])
            passer = _frames(other, n_frames, gen, background)
            dropped = torch.randperm(n_frames, generator=gen)[: n_frames // 2]
            frames[dropped] = shifts.apply("gaussian_noise", passer[dropped], 5, seed * 7919 + i)
        elif variant == "noise":
            frames = shifts.apply("gaussian_noise", frames, 3, seed * 7919 + i)
        videos.append(frames)
    return videos, labels
