"""ImageNet-C-style shifts for image tensors, deterministic from a seed.

Every shift maps images [B, 3, H, W] in [0, 1] to the same shape and range, at severity 1..5:
noise (gaussian, shot, impulse), blur (defocus, motion), weather (fog, snow), digital (contrast,
brightness, pixelate, jpeg, hue) and style (backgrounds never seen in training; needs the object
masks from `synthetic`). Held-out compositions are a shift of the data, not of pixels: see
`make_shifted`. `control` is the slight blur (sigma 0.8 px) that tells denoising-by-resampling
apart from adaptation.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import adjust_hue

SEVERITIES = (1, 2, 3, 4, 5)
# Severity parameters were set with the ResNet demo model (server/models/demo) so that severity 1 is
# mild, 5 near the floor, and 3 mostly in the informative 55-80% zero-shot band.
CONTROL_SIGMA = 0.8


def _param(values: tuple, severity: int):
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    return values[severity - 1]


def blur_kernel_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 2-D filter: one kernel [K, K] for all, or one per image [B, K, K]; reflect-padded."""
    b, c, h, w = x.shape
    k = kernel if kernel.dim() == 3 else kernel.expand(b, *kernel.shape)  # [B, K, K]
    pad = k.shape[-1] // 2
    xp = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    weight = k.repeat_interleave(c, dim=0).unsqueeze(1)  # [B*C, 1, K, K]
    return F.conv2d(xp, weight, groups=b * c).view(b, c, h, w)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with a kernel of radius ceil(3 sigma)."""
    r = max(1, math.ceil(3 * sigma))
    g = torch.exp(-(torch.arange(-r, r + 1.0) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return blur_kernel_conv(x, g[:, None] * g[None, :])


def plasma(b: int, h: int, w: int, gen: torch.Generator, octaves=(4, 8, 16)) -> torch.Tensor:
    """Smooth random fields in [0, 1], coarse octaves weighted most; [B, 1, H, W]."""
    field = torch.zeros(b, 1, h, w)
    for i, k in enumerate(octaves):
        field += 0.5**i * F.interpolate(
            torch.rand(b, 1, k, k, generator=gen), size=(h, w), mode="bicubic", align_corners=False
        )
    lo, hi = field.amin((2, 3), keepdim=True), field.amax((2, 3), keepdim=True)
    return (field - lo) / (hi - lo + 1e-8)


def gaussian_noise(x, s, gen, masks=None):
    return x + _param((0.045, 0.06, 0.08, 0.095, 0.12), s) * torch.randn(x.shape, generator=gen)


def shot_noise(x, s, gen, masks=None):
    lam = _param((200, 130, 85, 60, 40), s)  # photons per unit intensity: fewer is noisier
    return torch.poisson(x * lam, generator=gen) / lam


def impulse_noise(x, s, gen, masks=None):
    amount = _param((0.003, 0.005, 0.008, 0.012, 0.018), s)
    u = torch.rand(x.shape, generator=gen)
    salt = torch.rand(x.shape, generator=gen) < 0.5
    return torch.where(u < amount, salt.float(), x)


def defocus_blur(x, s, gen, masks=None):
    radius = _param((1.6, 2.2, 3.0, 3.6, 4.5), s)
    r = math.ceil(radius)
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
    disk = (radius + 0.5 - torch.sqrt(xx**2 + yy**2)).clamp(0, 1)  # anti-aliased disk
    return blur_kernel_conv(x, disk / disk.sum())


def motion_blur(x, s, gen, masks=None):
    length = _param((7, 9, 11, 14, 18), s)
    b, k = x.shape[0], length + (1 - length % 2)
    angle = torch.rand(b, generator=gen) * math.pi  # [B] a random direction per image
    t = torch.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * length)  # samples along the streak
    px = (k // 2 + t[None] * torch.cos(angle)[:, None]).round().long()  # [B, S]
    py = (k // 2 + t[None] * torch.sin(angle)[:, None]).round().long()
    kern = torch.zeros(b, k * k)
    kern.scatter_add_(1, py * k + px, torch.ones_like(px, dtype=torch.float))
    kern = kern.view(b, k, k)
    return blur_kernel_conv(x, kern / kern.sum((1, 2), keepdim=True))


def fog(x, s, gen, masks=None):
    amount = _param((0.3, 0.5, 0.7, 0.9, 1.2), s)
    f = plasma(x.shape[0], x.shape[2], x.shape[3], gen)  # [B, 1, H, W]
    peak = x.amax((1, 2, 3), keepdim=True)
    return (x + amount * f) * peak / (peak + amount)  # as ImageNet-C: add haze, renormalise


def snow(x, s, gen, masks=None):
    density, wash = _param(((0.004, 0.1), (0.008, 0.15), (0.012, 0.2), (0.018, 0.28), (0.025, 0.35)), s)
    b, _, h, w = x.shape
    flakes = (torch.rand(b, 1, h, w, generator=gen) < density).float()  # [B, 1, H, W]
    flakes = gaussian_blur(flakes, 0.7) * 4  # soft flakes about 2 px across
    grey = x.mean(1, keepdim=True)
    washed = (1 - wash) * x + wash * torch.maximum(x, grey * 1.5 + 0.5)  # the light of a snowy day
    return washed + flakes.clamp(0, 1)


def contrast(x, s, gen, masks=None):
    c = _param((0.7, 0.6, 0.5, 0.42, 0.33), s)
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def brightness(x, s, gen, masks=None):
    b = _param((0.1, 0.2, 0.3, 0.45, 0.6), s)
    v = x.amax(1, keepdim=True).clamp(min=1e-3)  # HSV value; scaling RGB keeps hue and saturation
    return x * ((v + b).clamp(max=1.0) / v)


def pixelate(x, s, gen, masks=None):
    f = _param((0.45, 0.35, 0.28, 0.22, 0.18), s)
    h, w = x.shape[2:]
    small = F.interpolate(x, size=(max(2, round(h * f)), max(2, round(w * f))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def jpeg(x, s, gen, masks=None):
    quality = _param((90, 75, 60, 45, 30), s)
    out = []
    for img in (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def hue(x, s, gen, masks=None):
    deg = _param((10, 14, 18, 24, 30), s)
    sign = torch.where(torch.rand(x.shape[0], generator=gen) < 0.5, -1.0, 1.0)  # [B] either way round
    return torch.stack([adjust_hue(img, float(sg) * deg / 360) for img, sg in zip(x.clamp(0, 1), sign, strict=True)])


def style(x, s, gen, masks=None):
    """Replace the background with colourful textures never seen in training (cloudy or wavy)."""
    if masks is None:
        raise ValueError("the style shift needs object masks [B, 1, H, W]")
    amount = _param((0.1, 0.15, 0.2, 0.3, 0.45), s)
    b, _, h, w = x.shape
    c1, c2 = torch.rand(b, 3, 1, 1, generator=gen), torch.rand(b, 3, 1, 1, generator=gen)
    cloudy = plasma(b, h, w, gen)  # [B, 1, H, W]
    yy, xx = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    freq = 3 + 4 * torch.rand(b, 1, 1, 1, generator=gen)
    wavy = 0.5 + 0.5 * torch.sin(2 * math.pi * freq * (yy + 0.1 * torch.sin(2 * math.pi * 2 * xx)))  # [B,1,H,W]
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
    t = pick * cloudy + (1 - pick) * wavy
    texture = c1 + (c2 - c1) * t  # [B, 3, H, W]
    grey = x.mean((1, 2, 3), keepdim=True)
    texture = grey + amount * (texture - grey)  # severity: how far from flat grey
    return x * masks + texture * (1 - masks)


def control(x: torch.Tensor) -> torch.Tensor:
    """The control row: a slight Gaussian blur (sigma 0.8 px), quantised like every shift."""
    return quantise(gaussian_blur(x, CONTROL_SIGMA))


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 8-bit grid, as a PNG would store it."""
    return torch.round(x.clamp(0, 1) * 255) / 255


Shift = Callable[..., torch.Tensor]
CORRUPTIONS: dict[str, Shift] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "fog": fog,
    "snow": snow,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "jpeg": jpeg,
    "hue": hue,
}
SHIFTS: dict[str, Shift] = {**CORRUPTIONS, "style": style}

# The shift families, as ImageNet-C groups them (style: unseen backgrounds). Calibration is designed on
# some families and reported on the others, so that no choice was made on the shifts it is judged on.
FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "motion_blur"),
    "weather": ("fog", "snow"),
    "digital": ("contrast", "brightness", "pixelate", "jpeg", "hue"),
    "style": ("style",),
}


def shift_seed(name: str, severity: int, seed: int) -> int:
    """Stable across runs and Python versions (no hash randomisation)."""
    return (zlib.crc32(name.encode()) * 31 + severity * 1_000_003 + seed * 7919) % (2**62)


def apply(
    name: str, images: torch.Tensor, severity: int, seed: int = 0, masks: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply shift `name` at `severity` to images [B, 3, H, W] in [0, 1]; same shape back."""
    gen = torch.Generator().manual_seed(shift_seed(name, severity, seed))
    return quantise(SHIFTS[name](images.float(), severity, gen, masks))


def make_shifted(
    name: str, severity: int, n: int, seed: int = 0, split: str = "test"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a whole set: 'clean', 'control', 'heldout' or any SHIFTS name, made from the
    test split (``split="test"``) or the validation split (``"val"``: seen compositions only, never
    held-out ones), so that choices made on validation shifts are never made on the test images."""
    from benchmarks._lib import synthetic

    if split == "val":
        if name == "heldout":
            raise ValueError("the validation split has no held-out compositions")
        source = "val"
    elif split == "test":
        source = "test_heldout" if name == "heldout" else "test_seen"
    else:
        raise ValueError(f"split must be 'test' or 'val', not {split!r}")
    batch = synthetic.make_split(source, n, seed)
    if name in ("clean", "heldout"):
        return batch.images, batch.labels
    if name == "control":
        return control(batch.images), batch.labels
    return apply(name, batch.images, severity, seed, batch.masks), batch.labels
