"""The shift suite: valid images, determinism, and distortion growing with severity."""

import itertools

import pytest
import torch

from benchmarks._lib import shifts as X
from benchmarks._lib import synthetic as S


@pytest.fixture(scope="module")
def batch():
    return S.make_split("test_seen", 24, 3)


def distortion(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("name", list(X.SHIFTS))
def test_every_severity_gives_valid_images_and_more_distortion(batch, name):
    dist = []
    for sev in X.SEVERITIES:
        out = X.apply(name, batch.images, sev, seed=0, masks=batch.masks)
        assert out.shape == batch.images.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        dist.append(distortion(out, batch.images))
    assert dist[0] > 0, name
    assert all(b > a for a, b in itertools.pairwise(dist)), (name, dist)


@pytest.mark.parametrize("name", list(X.SHIFTS))
def test_shifts_are_deterministic_from_the_seed(batch, name):
    a = X.apply(name, batch.images, 3, seed=1, masks=batch.masks)
    assert torch.equal(a, X.apply(name, batch.images, 3, seed=1, masks=batch.masks))


def test_random_shifts_change_with_the_seed(batch):
    a = X.apply("gaussian_noise", batch.images, 3, seed=1)
    assert not torch.equal(a, X.apply("gaussian_noise", batch.images, 3, seed=2))


def test_bad_severity_and_missing_masks_are_refused(batch):
    with pytest.raises(ValueError, match="severity must be one of"):
        X.apply("fog", batch.images, 6)
    with pytest.raises(ValueError, match="needs object masks"):
        X.apply("style", batch.images, 3)


def test_style_keeps_the_object_and_changes_the_background(batch):
    out = X.apply("style", batch.images, 5, masks=batch.masks)
    obj, bg = batch.masks > 0.99, batch.masks < 0.01
    diff = (out - batch.images).abs().mean(1, keepdim=True)  # [B, 1, H, W]
    assert diff[obj].max() < 1 / 255 + 1e-6 and diff[bg].mean() > 0.1


def test_control_is_a_slight_blur(batch):
    out = X.control(batch.images)
    assert out.shape == batch.images.shape
    mild = distortion(out, batch.images)
    assert 0 < mild < distortion(X.apply("defocus_blur", batch.images, 3), batch.images)


def test_make_shifted_covers_clean_control_heldout_and_shifts():
    for name in ["clean", "control", "heldout", "jpeg", "style"]:
        images, labels = X.make_shifted(name, 2, 8, seed=0)
        assert images.shape == (8, 3, S.IMAGE_SIZE, S.IMAGE_SIZE) and labels.shape == (8,)
    _, held = X.make_shifted("heldout", 1, 32)
    assert set(held.tolist()) <= set(S.HELD_OUT)
