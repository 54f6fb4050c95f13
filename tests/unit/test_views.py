"""TPT's augmented views: reproducible per seed, and the same crops and flips torchvision makes."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from adapters.views import RATIO, SCALE, make_views, resize_crops, sample_boxes

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = (32, 32)
# Our gather uses PyTorch's own bilinear index and weight formulas, so the only differences are float32
# rounding of the multiply-adds: a few ulps of values <= 1, times 1/std <= 3.9 after normalising, which is
# under 1e-6 (7e-7 seen). 1e-5 leaves room for other CPUs' instruction sets and still catches any
# misplaced sample, which moves values by about 1/255/std > 1e-2 on these random images.
ATOL = 1e-5


def image(h: int, w: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    img = torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))  # [3, H, W]
    return (img * 255).round().to(torch.uint8) if dtype == torch.uint8 else img


def normalise(x: torch.Tensor) -> torch.Tensor:
    return TF.normalize(x, list(MEAN), list(STD))


def views(img: torch.Tensor, n: int, seed: int, base: torch.Tensor | None = None) -> torch.Tensor:
    base = torch.zeros(3, *SIZE) if base is None else base
    return make_views(img, n, SIZE, MEAN, STD, torch.Generator().manual_seed(seed), base)


def test_same_seed_same_views_and_different_seed_different_views():
    img = image(60, 80)
    a, b, c = views(img, 8, seed=3), views(img, 8, seed=3), views(img, 8, seed=4)
    assert a.shape == (8, 3, *SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a[1:], c[1:])


def test_only_the_request_generator_is_used():
    # Concurrent requests must not perturb each other through the global RNG.
    before = torch.get_rng_state()
    views(image(40, 40), 16, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_view_zero_is_the_base_view_and_one_view_draws_nothing():
    img = image(50, 70)
    base = torch.randn(3, *SIZE)
    out = views(img, 5, seed=1, base=base)
    assert torch.equal(out[0], base)
    gen = torch.Generator().manual_seed(9)
    state = gen.get_state()
    only = make_views(img, 1, SIZE, MEAN, STD, gen, base)
    assert only.shape == (1, 3, *SIZE) and torch.equal(only[0], base)
    assert torch.equal(gen.get_state(), state)


def test_bad_arguments_are_refused():
    img = image(20, 20)
    with pytest.raises(ValueError, match="n_views"):
        make_views(img, 0, SIZE, MEAN, STD, torch.Generator(), torch.zeros(3, *SIZE))
    with pytest.raises(ValueError, match="base_view"):
        make_views(img, 4, SIZE, MEAN, STD, torch.Generator(), torch.zeros(3, 16, 16))


# (top, left, height, width) on a 45x70 image: upscaled, downscaled, whole image, one pixel, the
# bottom-right corner, output-sized (no resampling) and very elongated crops.
BOXES = [
    (3, 5, 10, 12),
    (0, 0, 45, 70),
    (44, 69, 1, 1),
    (10, 30, 35, 40),
    (5, 7, 32, 32),
    (0, 20, 45, 3),
    (20, 0, 2, 70),
    (12, 9, 33, 61),
]


@pytest.mark.parametrize("flip", [False, True])
def test_fixed_boxes_match_torchvision_resized_crop_flip_normalise(flip):
    img = image(45, 70)
    boxes = torch.tensor(BOXES)
    flips = torch.full((len(BOXES),), flip)
    ours = normalise(resize_crops(img, boxes, SIZE, flips))  # [V, 3, h, w]
    for k, (i, j, h, w) in enumerate(BOXES):
        ref = TF.resized_crop(img, i, j, h, w, list(SIZE), antialias=False)
        ref = normalise(TF.horizontal_flip(ref) if flip else ref)
        torch.testing.assert_close(ours[k], ref, atol=ATOL, rtol=0)


def test_uint8_images_round_like_torchvision():
    img = image(45, 70, torch.uint8)
    boxes = torch.tensor(BOXES)
    ours = resize_crops(img, boxes, SIZE)  # [V, 3, h, w] in [0, 1]
    for k, (i, j, h, w) in enumerate(BOXES):
        # torchvision's generic path (GPU, or CPU without AVX): interpolate in float, round to uint8.
        generic = TF.resized_crop(img.float(), i, j, h, w, list(SIZE), antialias=False).round() / 255
        assert torch.equal(ours[k], generic)
        # Its native CPU uint8 kernel uses fixed-point weights: at most one level apart.
        native = TF.resized_crop(img, i, j, h, w, list(SIZE), antialias=False).float() / 255
        assert (ours[k] - native).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize(
    ("h", "w", "dtype"),
    [
        (45, 70, torch.float32),
        (120, 90, torch.float32),
        (20, 30, torch.float32),
        (8, 200, torch.float32),
        (60, 50, torch.uint8),
    ],
)
def test_views_equal_torchvision_transforms_seeded_the_same(h, w, dtype):
    # TPT's recipe with torchvision's own transforms and the global RNG seeded with our seed.
    img = image(h, w, dtype)
    ours = views(img, 12, seed=5)
    torch.manual_seed(5)
    recipe = v2.Compose([v2.RandomResizedCrop(SIZE, antialias=False), v2.RandomHorizontalFlip()])
    ref = torch.stack([normalise(TF.to_dtype(recipe(img), torch.float32, scale=True)) for _ in range(11)])
    if dtype == torch.uint8:  # torchvision's native uint8 kernel: within one level (see above)
        assert (ours[1:] - ref).abs().max() <= 1 / 255 / min(STD) + 1e-5
    else:
        torch.testing.assert_close(ours[1:], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("h", "w"), [(240, 320), (20, 30), (8, 200), (200, 8), (1, 1)])
def test_boxes_and_flips_are_torchvisions_draws(h, w):
    # (8, 200) and (200, 8) often exhaust the 10 tries and take the central fallback.
    boxes, flips = sample_boxes(h, w, 50, torch.Generator().manual_seed(11))
    torch.manual_seed(11)
    dummy = torch.empty(3, h, w)
    for k in range(50):
        assert tuple(boxes[k].tolist()) == RandomResizedCrop.get_params(dummy, list(SCALE), list(RATIO))
        assert bool(flips[k]) == bool(torch.rand(1) < 0.5)


def test_box_distribution_respects_scale_and_ratio():
    h, w, n = 240, 320, 3000
    boxes, flips = sample_boxes(h, w, n, torch.Generator().manual_seed(0))
    top, left, bh, bw = boxes.T.double()
    assert bool(((top >= 0) & (left >= 0) & (top + bh <= h) & (left + bw <= w) & (bh > 0) & (bw > 0)).all())
    # w and h are rounded from sqrt(area * ratio) and sqrt(area / ratio): allow half a pixel each way.
    area_hi, area_lo = (bw + 0.5) * (bh + 0.5) / (h * w), (bw - 0.5) * (bh - 0.5) / (h * w)
    assert bool((area_hi >= SCALE[0]).all()) and bool((area_lo <= SCALE[1]).all())
    assert bool(((bw + 0.5) / (bh - 0.5) >= RATIO[0]).all()) and bool(((bw - 0.5) / (bh + 0.5) <= RATIO[1]).all())
    # ... and the whole ranges are used. (Their means are not the priors': tries that do not fit the
    # image are rejected, which favours wide crops on a wide image; the torchvision parity test pins that.)
    area = bw * bh / (h * w)
    log_ratio = torch.log(bw / bh)
    assert area.min() < 0.1 and area.max() > 0.9
    assert log_ratio.min() < math.log(RATIO[0]) + 0.05 and log_ratio.max() > math.log(RATIO[1]) - 0.05
    assert abs(float(flips.double().mean()) - 0.5) < 0.04


def test_tiny_and_non_square_images_give_full_size_finite_views():
    for h, w in [(20, 30), (30, 20), (1, 1), (500, 40)]:
        out = views(image(h, w), 10, seed=2)
        assert out.shape == (10, 3, *SIZE) and bool(torch.isfinite(out).all())
