"""AugMix views as TPT makes them (azshue/TPT ``data/datautils.py: augmix``, ``data/augmix_ops.py``).

Each AugMix view starts from a random resized crop with a flip (``x_orig``, as our crop-and-flip
views are made, see ``adapters.views``) and mixes it with three chains of PIL operations:

    w ~ Dirichlet(1, 1, 1), m ~ Beta(1, 1)                        (both cast to float32)
    chain i: 1 to 3 operations drawn uniformly from the nine below, applied in turn to x_orig
    view = m * preprocess(x_orig) + (1 - m) * sum_i w_i * preprocess(chain_i)

where ``preprocess`` is ToTensor then the model's Normalize. The nine operations are AugMix's
without the four that overlap ImageNet-C (colour, contrast, brightness, sharpness): autocontrast,
equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x, translate_y, at severity 1
(a level drawn uniformly in [0.1, 1], then scaled as AugMix scales it).

How ours departs from the official code:

- The random draws come from the request's ``torch.Generator`` (``TorchDraws``), not NumPy's global
  generator, in the official order; ``sample_plan`` takes any ``Draws``, so the test feeds it
  NumPy's and compares with a faithful reference of the official functions, draw for draw.
- The official operations hard-code a 224 px canvas (``IMAGE_SIZE``) for shears and translations
  and 224/3 px for the largest translation; we use the view's own size, which is the same at 224.
- The crop itself is ours (no PIL antialiasing, see ``adapters.views``), then rounded to uint8 for
  the PIL operations, as TPT's crop is a uint8 PIL image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

OPS = (
    "autocontrast",
    "equalize",
    "posterize",
    "rotate",
    "solarize",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
CHAINS = 3  # AugMix's mixture width
MAX_DEPTH = 3  # each chain applies 1 to 3 operations
SEVERITY = 1.0  # TPT's AugMixAugmenter default
_LEVELLED = {"posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x", "translate_y"}
_SIGNED = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}


class Draws(Protocol):
    """The random numbers AugMix needs, so one plan sampler serves the server and the reference check."""

    def dirichlet3(self) -> np.ndarray: ...  # [3] float64 summing to 1, Dirichlet(1, 1, 1)

    def beta(self) -> float: ...  # Beta(1, 1)

    def randint(self, low: int, high: int) -> int: ...  # uniform in [low, high)

    def uniform(self, low: float, high: float) -> float: ...


class TorchDraws:
    """``Draws`` from a request's generator: Dirichlet(1,1,1) as normalised Exp(1) draws, Beta(1,1) as U(0,1)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def _rand(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64, device=self.generator.device).cpu()

    def dirichlet3(self) -> np.ndarray:
        e = -torch.log1p(-self._rand(3))  # [3] Exp(1); log1p(-u) is finite for u in [0, 1)
        return (e / e.sum()).numpy()

    def beta(self) -> float:
        return float(self._rand(1))

    def randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.generator, device=self.generator.device))

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(self._rand(1))


@dataclass(frozen=True)
class Op:
    name: str
    level: float = 0.0  # the drawn level in [0.1, severity]; unused by autocontrast and equalize
    negate: bool = False  # rotations, shears and translations go the other way


@dataclass(frozen=True)
class Plan:
    """One AugMix view's random choices: mixing weights and the three chains."""

    weights: tuple[float, ...]  # [3] float32 values (the official casts the Dirichlet draw to float32)
    mix: float  # m, a float32 value: the share of the un-augmented crop
    chains: tuple[tuple[Op, ...], ...]


def sample_plan(draws: Draws, severity: float = SEVERITY) -> Plan:
    """Draw one view's plan in the official order: w, m, then per chain its depth and each op's draws."""
    weights = tuple(float(w) for w in draws.dirichlet3().astype(np.float32))
    mix = float(np.float32(draws.beta()))
    chains = []
    for _ in range(CHAINS):
        ops = []
        for _ in range(draws.randint(1, MAX_DEPTH + 1)):
            name = OPS[draws.randint(0, len(OPS))]
            level = draws.uniform(0.1, severity) if name in _LEVELLED else 0.0
            negate = draws.uniform(0.0, 1.0) > 0.5 if name in _SIGNED else False
            ops.append(Op(name, level, negate))
        chains.append(tuple(ops))
    return Plan(weights, mix, tuple(chains))


def _int_level(level: float, maxval: float) -> int:
    return int(level * maxval / 10)  # AugMix's int_parameter


def _float_level(level: float, maxval: float) -> float:
    return float(level) * maxval / 10.0  # AugMix's float_parameter


def apply_op(image: Image.Image, op: Op) -> Image.Image:
    """One AugMix operation on a uint8 RGB PIL image, at the plan's level and sign."""
    size = image.size
    sign = -1 if op.negate else 1
    if op.name == "autocontrast":
        return ImageOps.autocontrast(image)
    if op.name == "equalize":
        return ImageOps.equalize(image)
    if op.name == "posterize":
        return ImageOps.posterize(image, 4 - _int_level(op.level, 4))
    if op.name == "rotate":
        return image.rotate(sign * _int_level(op.level, 30), resample=Image.Resampling.BILINEAR)
    if op.name == "solarize":
        return ImageOps.solarize(image, 256 - _int_level(op.level, 256))
    affine: dict[str, Callable[[float], tuple[float, ...]]] = {
        "shear_x": lambda s: (1, s, 0, 0, 1, 0),
        "shear_y": lambda s: (1, 0, 0, s, 1, 0),
        "translate_x": lambda t: (1, 0, t, 0, 1, 0),
        "translate_y": lambda t: (1, 0, 0, 0, 1, t),
    }
    if op.name in ("shear_x", "shear_y"):
        amount: float = sign * _float_level(op.level, 0.3)
    else:  # a translation, at most a third of the side (TPT: 224 / 3)
        amount = sign * _int_level(op.level, size[0] / 3)
    coeffs = affine[op.name](amount)
    return image.transform(size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


def _preprocess(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """ToTensor then Normalize: [3, h, w] float32."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return (x - mean) / std


def augmix_view(crop: torch.Tensor, plan: Plan, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Mix one uint8 crop [3, h, w] (CPU) with its plan's chains: the normalised view [3, h, w] float32."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    original = Image.fromarray(crop.permute(1, 2, 0).numpy())
    processed = _preprocess(original, m, s)
    mixed = torch.zeros_like(processed)
    for weight, chain in zip(plan.weights, plan.chains, strict=True):
        image = original.copy()
        for op in chain:
            image = apply_op(image, op)
        mixed += weight * _preprocess(image, m, s)
    rest = float(np.float32(1) - np.float32(plan.mix))  # 1 - m in float32, as the official computes it
    return plan.mix * processed + rest * mixed
