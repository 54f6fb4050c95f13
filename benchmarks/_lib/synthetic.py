"""Procedural captioned shapes: a tiny compositional image-text data set, deterministic from a seed.

Each image shows one or two objects of one (colour, shape) pair, of a size, at a position, on a
grey patterned background. Captions name a random subset of those attributes. The zero-shot task
is the 64-way (colour, shape) label; eight pairs never appear in training ("held-out
compositions"), so zero-shot on unseen compositions can be measured.

Images are float tensors in [0, 1], shape [B, 3, 64, 64], quantised to the 8-bit grid so they
survive a PNG round trip unchanged. Everything is rendered in torch, batched, on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_SIZE = 64
# Colour names all start with a consonant so every template can say "a {class}".
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "brown": (0.52, 0.30, 0.10),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.10, 0.65, 0.15),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.12, 0.25, 0.90),
    "purple": (0.55, 0.15, 0.80),
    "pink": (0.98, 0.50, 0.75),
}
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart"]
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
SIZES = {"small": 0.13, "large": 0.22}  # object radius as a fraction of the image side
BACKGROUNDS = ["plain", "striped", "checkered", "dotted"]  # seen in training
ROWS, COLS = ["top", "middle", "bottom"], ["left", "centre", "right"]

COLOUR_NAMES = list(COLOURS)
CLASS_NAMES = [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]  # label = colour * 8 + shape
# One held-out shape per colour and one colour per shape (a shifted diagonal), so every colour and
# every shape is still seen in training, only never in these pairings.
HELD_OUT = sorted(c * len(SHAPES) + (3 * c + 1) % len(SHAPES) for c in range(len(COLOURS)))
HELD_OUT_NAMES = [CLASS_NAMES[i] for i in HELD_OUT]
SEEN = [i for i in range(len(CLASS_NAMES)) if i not in HELD_OUT]
# Zero-shot templates; the first is CLIP's usual 4-token context "a photo of a".
TEMPLATES = ["a photo of a {}.", "a {}.", "a picture of a {}."]
SPLITS = {"train": 1, "val": 2, "test_seen": 3, "test_heldout": 4}


@dataclass
class Batch:
    """A rendered batch; attribute tensors are all [B]."""

    images: torch.Tensor  # [B, 3, H, W] float in [0, 1]
    masks: torch.Tensor  # [B, 1, H, W] object coverage in [0, 1]
    labels: torch.Tensor  # [B] class index into CLASS_NAMES
    colour: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor  # 0 small, 1 large
    count: torch.Tensor  # 1 or 2
    background: torch.Tensor  # index into BACKGROUNDS
    row: torch.Tensor  # position of the first object, index into ROWS
    col: torch.Tensor  # index into COLS
    captions: list[str]


def chunk_seed(seed: int, split: str, index: int) -> int:
    """A distinct, reproducible generator seed per (seed, split, chunk)."""
    return (seed * 1_000_003 + SPLITS[split] * 10_000_019 + index * 7919) % (2**62)


def shape_mask(shape: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-test for one shape id on object-centred coordinates u, v (radius 1); [B, H, W] bool."""
    rho, theta = torch.sqrt(u * u + v * v), torch.atan2(v, u)

    def polygon(n: int, radius: float, vertex: float) -> torch.Tensor:
        phi = torch.remainder(theta - vertex, 2 * math.pi / n) - math.pi / n
        return rho * torch.cos(phi) <= radius * math.cos(math.pi / n)

    def star() -> torch.Tensor:
        phi = torch.remainder(theta + math.pi / 2 + math.pi / 5, 2 * math.pi / 5) - math.pi / 5
        return rho <= 1.05 - (1.05 - 0.42) * phi.abs() / (math.pi / 5)

    def heart() -> torch.Tensor:
        x, y = u * 1.25, -v * 1.25 + 0.15  # image y points down; the curve's y points up
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0

    tests = [
        lambda: rho <= 0.95,
        lambda: torch.maximum(u.abs(), v.abs()) <= 0.78,
        lambda: polygon(3, 1.05, -math.pi / 2) & (v <= 0.55),
        star,
        lambda: ((u.abs() < 0.3) & (v.abs() < 0.95)) | ((v.abs() < 0.3) & (u.abs() < 0.95)),
        lambda: u.abs() + v.abs() <= 1.05,
        lambda: polygon(6, 0.98, 0.0),
        heart,
    ]
    return tests[shape]()


def object_masks(
    shape: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, rot: torch.Tensor, res: int
) -> torch.Tensor:
    """Coverage masks of one object per image; [B, res, res]. Each shape is tested only on its rows."""
    n = shape.shape[0]
    coords = (torch.arange(res) + 0.5) / res
    out = torch.zeros(n, res, res)
    for k in range(len(SHAPES)):
        idx = (shape == k).nonzero().flatten()
        if idx.numel() == 0:
            continue
        r, c = radius[idx].view(-1, 1, 1), centre[idx]
        dx = (coords.view(1, 1, res) - c[:, 0].view(-1, 1, 1)) / r  # [b, 1, res]
        dy = (coords.view(1, res, 1) - c[:, 1].view(-1, 1, 1)) / r  # [b, res, 1]
        cr, sr = torch.cos(rot[idx]).view(-1, 1, 1), torch.sin(rot[idx]).view(-1, 1, 1)
        out[idx] = shape_mask(k, dx * cr + dy * sr, -dx * sr + dy * cr).float()
    return out


def render_background(kind: torch.Tensor, gen: torch.Generator, res: int) -> torch.Tensor:
    """Grey two-level patterns (plain, striped, checkered, dotted); [B, res, res]."""
    b = kind.shape[0]
    base = 0.2 + 0.6 * torch.rand(b, generator=gen)  # [B]
    other = (base + torch.where(base > 0.5, -1.0, 1.0) * (0.15 + 0.1 * torch.rand(b, generator=gen))).clamp(0, 1)
    period = (res / IMAGE_SIZE) * (6 + 6 * torch.rand(b, generator=gen))  # [B] pixels
    phase = res * torch.rand(b, 2, generator=gen)  # [B, 2]
    angle = torch.randint(0, 4, (b,), generator=gen) * (math.pi / 4)  # [B]
    pattern = torch.zeros(b, res, res, dtype=torch.bool)
    pix = torch.arange(res) + 0.5
    for k in (1, 2, 3):  # plain (0) has no pattern
        idx = (kind == k).nonzero().flatten()
        if idx.numel() == 0:
            continue
        p = period[idx].view(-1, 1, 1)
        xs = pix.view(1, 1, res) + phase[idx, 0].view(-1, 1, 1)  # [b, 1, res]
        ys = pix.view(1, res, 1) + phase[idx, 1].view(-1, 1, 1)  # [b, res, 1]
        if k == 1:
            a = angle[idx].view(-1, 1, 1)
            pattern[idx] = torch.remainder((xs * torch.cos(a) + ys * torch.sin(a)) / p, 1.0) < 0.5
        elif k == 2:
            pattern[idx] = (torch.floor(xs / p) + torch.floor(ys / p)) % 2 == 1
        else:
            cx, cy = torch.remainder(xs, p) - p / 2, torch.remainder(ys, p) - p / 2
            pattern[idx] = cx * cx + cy * cy < (p * 0.28) ** 2
    return torch.where(pattern, other.view(b, 1, 1), base.view(b, 1, 1))  # [B, res, res]


def sample_attributes(n: int, classes: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw per-image attributes, with classes drawn uniformly from `classes`."""
    cls = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=gen)]
    return {
        "labels": cls,
        "colour": cls // len(SHAPES),
        "shape": cls % len(SHAPES),
        "size": torch.randint(0, 2, (n,), generator=gen),
        "count": 1 + (torch.rand(n, generator=gen) < 0.25).long(),
        "background": torch.randint(0, len(BACKGROUNDS), (n,), generator=gen),
    }


def render(attrs: dict[str, torch.Tensor], gen: torch.Generator, supersample: int = 2) -> Batch:
    """Render images for given attributes; supersampled then box-filtered for smooth edges."""
    n, res = attrs["labels"].shape[0], IMAGE_SIZE * supersample
    radius = torch.tensor(list(SIZES.values()))[attrs["size"]] * (0.9 + 0.2 * torch.rand(n, generator=gen))
    rgb = torch.tensor(list(COLOURS.values()))[attrs["colour"]]  # [B, 3]
    rgb = (rgb + 0.06 * (torch.rand(n, 3, generator=gen) - 0.5)).clamp(0, 1)
    rot = (torch.rand(n, generator=gen) - 0.5) * (math.pi / 9)  # +-10 degrees keeps squares square
    grey = render_background(attrs["background"], gen, res)  # [B, res, res]
    lo, hi = radius + 0.02, 1 - radius - 0.02
    first = lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * torch.rand(n, 2, generator=gen)  # [B, 2] x, y
    # Second object: the farthest of three candidates, so the two rarely overlap.
    cands = lo.view(n, 1, 1) + (hi - lo).view(n, 1, 1) * torch.rand(n, 3, 2, generator=gen)  # [B, 3, 2]
    best = (cands - first.unsqueeze(1)).norm(dim=2).argmax(dim=1)
    second = cands[torch.arange(n), best]  # [B, 2]
    mask = object_masks(attrs["shape"], first, radius, rot, res)
    two = (attrs["count"] == 2).nonzero().flatten()
    if two.numel():
        mask[two] = torch.maximum(mask[two], object_masks(attrs["shape"][two], second[two], radius[two], rot[two], res))
    # Compositing is linear, so box-filter the one-channel parts before colouring: 3x less work.
    bg = F.avg_pool2d((grey * (1 - mask)).unsqueeze(1), supersample)  # [B, 1, 64, 64]
    mask = F.avg_pool2d(mask.unsqueeze(1), supersample)  # [B, 1, 64, 64]
    img = bg + rgb.view(n, 3, 1, 1) * mask  # [B, 3, 64, 64]
    img = torch.round(img.clamp(0, 1) * 255) / 255
    row = (first[:, 1] * 3).long().clamp(0, 2)
    col = (first[:, 0] * 3).long().clamp(0, 2)
    caps = make_captions(attrs, row, col, gen)
    return Batch(
        img,
        mask,
        attrs["labels"],
        attrs["colour"],
        attrs["shape"],
        attrs["size"],
        attrs["count"],
        attrs["background"],
        row,
        col,
        caps,
    )


def make_captions(
    attrs: dict[str, torch.Tensor], row: torch.Tensor, col: torch.Tensor, gen: torch.Generator
) -> list[str]:
    """Captions naming colour and shape always, and size, background, position sometimes."""
    n = row.shape[0]
    flags = torch.rand(n, 4, generator=gen)  # prefix choice, size, background, position
    out = []
    for i in range(n):
        colour, shape = COLOUR_NAMES[attrs["colour"][i]], SHAPES[attrs["shape"][i]]
        two = bool(attrs["count"][i] == 2)
        words = ["two" if two else "a"]
        if flags[i, 1] < 0.5:
            words.append(list(SIZES)[attrs["size"][i]])
        words += [colour, PLURALS[shape] if two else shape]
        if flags[i, 2] < 0.4:
            words += ["on", "a", BACKGROUNDS[attrs["background"][i]], "background"]
        elif flags[i, 3] < 0.3 and not two:
            pos = f"{ROWS[row[i]]} {COLS[col[i]]}" if (row[i], col[i]) != (1, 1) else "centre"
            words += ["in", "the", pos]
        prefix = "a photo of " if flags[i, 0] < 0.5 else ("a picture of " if flags[i, 0] < 0.7 else "")
        out.append(prefix + " ".join(words) + ".")
    return out


def make_batch(split: str, seed: int, index: int, batch_size: int) -> Batch:
    """Batch number `index` of a split; the same arguments always give the same batch."""
    gen = torch.Generator().manual_seed(chunk_seed(seed, split, index))
    classes = HELD_OUT if split == "test_heldout" else SEEN
    return render(sample_attributes(batch_size, classes, gen), gen)


def make_split(split: str, n: int, seed: int = 0, chunk: int = 256) -> Batch:
    """The first n images of a split, rendered in fixed chunks so any n is a prefix of a larger n."""
    parts = [make_batch(split, seed, i, chunk) for i in range((n + chunk - 1) // chunk)]
    cat = {
        k: torch.cat([getattr(p, k) for p in parts])[:n]
        for k in ("images", "masks", "labels", "colour", "shape", "size", "count", "background", "row", "col")
    }
    return Batch(**cat, captions=[c for p in parts for c in p.captions][:n])


def label_sets() -> dict[str, dict[str, list[str]]]:
    """Zero-shot label sets with their templates, as shipped in ttaserve.json."""
    return {
        "demo-shapes": {"labels": CLASS_NAMES, "templates": TEMPLATES},
    }
