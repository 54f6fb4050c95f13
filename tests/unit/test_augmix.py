"""AugMix views against the official TPT pipeline, draw for draw.

``official_augmix`` below is a faithful reference of azshue/TPT's ``data/datautils.py: augmix`` (after
its crop) and ``data/augmix_ops.py``: the same NumPy calls in the same order (``np.random.choice``
of the operation, ``np.random.uniform()`` and ``np.random.random()`` for signs, Dirichlet and Beta
weights cast to float32), on a 224 px crop so its hard-coded ``IMAGE_SIZE`` holds. Ours draws its
plan through the ``Draws`` protocol; fed NumPy's global generator after the same seed, it must
consume the same numbers in the same order and produce the same pixels. A different call order, a
wrong level scaling, a swapped sign or a different mix would all break equality.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from adapters import get_method
from adapters.augmix import OPS, TorchDraws, augmix_view, sample_plan
from adapters.views import make_views
from server.engine.admission import CostModel, augmix_view_s

IMAGE_SIZE = 224
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


# -- the official operations, as azshue/TPT writes them (data/augmix_ops.py) ----------------------
def int_parameter(level, maxval):
    return int(level * maxval / 10)


def float_parameter(level, maxval):
    return float(level) * maxval / 10.0


def sample_level(n):
    return np.random.uniform(low=0.1, high=n)


def autocontrast(pil_img, _):
    return ImageOps.autocontrast(pil_img)


def equalize(pil_img, _):
    return ImageOps.equalize(pil_img)


def posterize(pil_img, level):
    level = int_parameter(sample_level(level), 4)
    return ImageOps.posterize(pil_img, 4 - level)


def rotate(pil_img, level):
    degrees = int_parameter(sample_level(level), 30)
    if np.random.uniform() > 0.5:
        degrees = -degrees
    return pil_img.rotate(degrees, resample=Image.BILINEAR)


def solarize(pil_img, level):
    level = int_parameter(sample_level(level), 256)
    return ImageOps.solarize(pil_img, 256 - level)


def shear_x(pil_img, level):
    level = float_parameter(sample_level(level), 0.3)
    if np.random.uniform() > 0.5:
        level = -level
    return pil_img.transform((IMAGE_SIZE, IMAGE_SIZE), Image.AFFINE, (1, level, 0, 0, 1, 0), resample=Image.BILINEAR)


def shear_y(pil_img, level):
    level = float_parameter(sample_level(level), 0.3)
    if np.random.uniform() > 0.5:
        level = -level
    return pil_img.transform((IMAGE_SIZE, IMAGE_SIZE), Image.AFFINE, (1, 0, 0, level, 1, 0), resample=Image.BILINEAR)


def translate_x(pil_img, level):
    level = int_parameter(sample_level(level), IMAGE_SIZE / 3)
    if np.random.random() > 0.5:
        level = -level
    return pil_img.transform((IMAGE_SIZE, IMAGE_SIZE), Image.AFFINE, (1, 0, level, 0, 1, 0), resample=Image.BILINEAR)


def translate_y(pil_img, level):
    level = int_parameter(sample_level(level), IMAGE_SIZE / 3)
    if np.random.random() > 0.5:
        level = -level
    return pil_img.transform((IMAGE_SIZE, IMAGE_SIZE), Image.AFFINE, (1, 0, 0, 0, 1, level), resample=Image.BILINEAR)


augmentations = [autocontrast, equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x, translate_y]


def preprocess(pil_img):  # transforms.ToTensor() then transforms.Normalize(MEAN, STD)
    x = torch.from_numpy(np.asarray(pil_img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def official_augmix(x_orig, aug_list=augmentations, severity=1):
    """data/datautils.py: augmix, from its crop (``x_orig = preaugment(image)``) on."""
    x_processed = preprocess(x_orig)
    w = np.float32(np.random.dirichlet([1.0, 1.0, 1.0]))
    m = np.float32(np.random.beta(1.0, 1.0))
    mix = torch.zeros_like(x_processed)
    for i in range(3):
        x_aug = x_orig.copy()
        for _ in range(np.random.randint(1, 4)):
            x_aug = np.random.choice(aug_list)(x_aug, severity)
        mix += w[i] * preprocess(x_aug)
    return m * x_processed + (1 - m) * mix


class NumpyDraws:
    """Our ``Draws`` over NumPy's global generator, as the official code draws."""

    def dirichlet3(self) -> np.ndarray:
        return np.random.dirichlet([1.0, 1.0, 1.0])

    def beta(self) -> float:
        return float(np.random.beta(1.0, 1.0))

    def randint(self, low: int, high: int) -> int:
        return int(np.random.randint(low, high))

    def uniform(self, low: float, high: float) -> float:
        return float(np.random.uniform(low, high))


def crop(seed: int) -> torch.Tensor:
    """A textured uint8 224 px crop [3, 224, 224]: smooth gradients and edges, so every op changes it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    base = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.float64) * (200 / IMAGE_SIZE)
    base[60:160, 80:150] = rng.integers(0, 256, 3)
    return torch.from_numpy((base + rng.integers(0, 30, base.shape)).clip(0, 255).astype(np.uint8)).permute(2, 0, 1)


@pytest.mark.parametrize("seed", range(40))
def test_ours_equals_the_official_augmix_on_the_same_draws(seed: int) -> None:
    x = crop(seed)
    np.random.seed(seed)
    expected = official_augmix(Image.fromarray(x.permute(1, 2, 0).numpy()))
    np.random.seed(seed)
    plan = sample_plan(NumpyDraws())
    ours = augmix_view(x, plan, MEAN, STD)
    # Both consumed the same numbers: the next draw agrees too.
    after_ours = np.random.random()
    np.random.seed(seed)
    official_augmix(Image.fromarray(x.permute(1, 2, 0).numpy()))
    assert np.random.random() == after_ours
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_the_seeds_above_exercise_every_operation_both_ways() -> None:
    seen = set()
    for seed in range(40):
        np.random.seed(seed)
        plan = sample_plan(NumpyDraws())
        seen |= {(op.name, op.negate) for chain in plan.chains for op in chain}
    names = {name for name, _ in seen}
    assert names == set(OPS)
    for signed in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        assert {(signed, True), (signed, False)} <= seen


def test_torch_draws_follow_augmix_distributions() -> None:
    draws = TorchDraws(torch.Generator().manual_seed(0))
    plans = [sample_plan(draws) for _ in range(3000)]
    weights = np.stack([p.weights for p in plans])  # [N, 3]
    assert np.allclose(weights.sum(1), 1, atol=1e-6) and (weights > 0).all()
    assert np.allclose(weights.mean(0), 1 / 3, atol=0.02)  # Dirichlet(1,1,1): mean 1/3, var 1/18
    assert abs(weights.var(0).mean() - 1 / 18) < 0.006
    mixes = np.array([p.mix for p in plans])
    assert abs(mixes.mean() - 0.5) < 0.02 and abs(mixes.var() - 1 / 12) < 0.006  # Beta(1,1) = U(0,1)
    depths = np.bincount([len(c) for p in plans for c in p.chains], minlength=4)[1:]
    assert np.allclose(depths / depths.sum(), 1 / 3, atol=0.02)
    ops = [op for p in plans for c in p.chains for op in c]
    counts = np.array([sum(op.name == name for op in ops) for name in OPS])
    assert np.allclose(counts / len(ops), 1 / len(OPS), atol=0.01)
    levels = np.array([op.level for op in ops if op.name == "rotate"])
    assert levels.min() >= 0.1 and levels.max() <= 1.0 and abs(levels.mean() - 0.55) < 0.02


def test_augmix_views_keep_the_base_view_and_are_reproducible() -> None:
    image = crop(0)[:, :200, :180]
    base = torch.zeros(3, 64, 64)

    def views(aug: str, seed: int) -> torch.Tensor:
        return make_views(image, 6, (64, 64), MEAN, STD, torch.Generator().manual_seed(seed), base, augmentation=aug)

    mixed = views("augmix", 3)
    assert mixed.shape == (6, 3, 64, 64)
    assert torch.equal(mixed[0], base)
    assert torch.equal(mixed, views("augmix", 3))
    assert not torch.allclose(mixed[1:], views("crop_flip", 3)[1:], atol=1e-3)
    with pytest.raises(ValueError, match="augmentation"):
        views("cutmix", 3)


# -- pricing: AugMix views cost more to make than crops with flips --------------------------------
def test_admission_prices_augmix_views_above_crops_with_flips():
    model = SimpleNamespace(image_size=(64, 64), preprocess_cfg=SimpleNamespace(mean=MEAN, std=STD))
    extra = augmix_view_s(model, n=8)  # measured: the PIL chains of AugMix against a vectorised crop
    assert extra > 0.0
    costs = CostModel(image_s=0.01, prompt_s=0.001, augmix_view_s=extra)
    tpt = get_method("tpt")
    plain, mixed = tpt.parse_options({}), tpt.parse_options({"augmentation": "augmix"})
    gap = costs.estimate_s(tpt, mixed, 3, 10) - costs.estimate_s(tpt, plain, 3, 10)
    assert gap == pytest.approx(3 * (plain.views - 1) * extra)  # every view but the image itself
    assert costs.in_images(tpt, mixed, 10) > costs.in_images(tpt, plain, 10)  # weighs more against rate limits
    zero_shot = get_method("zero_shot")
    assert costs.estimate_s(zero_shot, zero_shot.parse_options({}), 3, 10) == pytest.approx(3 * 0.01)
