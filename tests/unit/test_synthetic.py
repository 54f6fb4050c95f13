"""The procedural shapes data set: determinism, held-out pairs, captions, and the shipped demo model."""

from pathlib import Path

import pytest
import torch

from benchmarks._lib import synthetic as S

DEMO = Path(__file__).resolve().parents[2] / "server" / "models" / "demo"


def test_same_seed_same_batch_and_other_seed_differs():
    a, b = S.make_batch("train", 7, 3, 16), S.make_batch("train", 7, 3, 16)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    c = S.make_batch("train", 8, 3, 16)
    assert not torch.equal(a.images, c.images)


def test_splits_differ_and_make_split_is_a_prefix():
    val, test = S.make_split("val", 32, 0), S.make_split("test_seen", 32, 0)
    assert not torch.equal(val.images, test.images)
    small, big = S.make_split("val", 10, 0, chunk=8), S.make_split("val", 30, 0, chunk=8)
    assert torch.equal(small.images, big.images[:10]) and small.captions == big.captions[:10]


def test_images_are_valid_8bit_rgb():
    b = S.make_batch("val", 0, 0, 32)
    assert b.images.shape == (32, 3, S.IMAGE_SIZE, S.IMAGE_SIZE) and b.images.dtype == torch.float32
    assert b.images.min() >= 0 and b.images.max() <= 1
    assert torch.equal(b.images, torch.round(b.images * 255) / 255)
    assert b.masks.shape == (32, 1, S.IMAGE_SIZE, S.IMAGE_SIZE) and (b.masks.flatten(1).amax(1) > 0.5).all()


def test_held_out_pairs_never_in_training_and_only_in_held_out_test():
    held = set(S.HELD_OUT)
    assert len(held) == 8 and {c // 8 for c in held} == set(range(8)) and {c % 8 for c in held} == set(range(8))
    for i in range(4):
        train = S.make_batch("train", 0, i, 256)
        assert not held & set(train.labels.tolist())
        assert not any(name in cap for cap in train.captions for name in S.HELD_OUT_NAMES)
    assert set(S.make_split("test_heldout", 64, 0).labels.tolist()) <= held
    assert not held & set(S.make_split("test_seen", 256, 0).labels.tolist())


def test_captions_match_attributes():
    b = S.make_batch("train", 1, 0, 128)
    for i, cap in enumerate(b.captions):
        colour, shape = S.COLOUR_NAMES[b.colour[i]], S.SHAPES[b.shape[i]]
        two = int(b.count[i]) == 2
        assert f"{colour} {S.PLURALS[shape] if two else shape}" in cap, cap
        assert ("two " in cap) == two, cap
        assert S.CLASS_NAMES[b.labels[i]] == f"{colour} {shape}"
        size = list(S.SIZES)[b.size[i]]
        assert not any(f" {w} " in cap for w in S.SIZES if w != size), cap
        if "background" in cap:
            assert f"on a {S.BACKGROUNDS[b.background[i]]} background" in cap, cap


def test_label_set_covers_all_pairs():
    sets = S.label_sets()
    assert sets["demo-shapes"]["labels"] == S.CLASS_NAMES and len(S.CLASS_NAMES) == 64
    assert all("{}" in t for t in sets["demo-shapes"]["templates"])


@pytest.mark.skipif(not (DEMO / "open_clip_config.json").exists(), reason="demo model not built")
def test_shipped_demo_model_loads_and_beats_chance():
    import open_clip

    from benchmarks import demo_eval

    model, tokenizer, pre = demo_eval.load_folder(DEMO)
    assert isinstance(open_clip.get_tokenizer(f"local-dir:{DEMO}"), type(tokenizer))
    assert pre["size"] == S.IMAGE_SIZE
    classes = demo_eval.class_embeddings(model, tokenizer, S.CLASS_NAMES, S.TEMPLATES)
    batch = S.make_split("test_seen", 64, 5)
    logits = demo_eval.zero_shot_logits(model, batch.images, classes, pre["mean"], pre["std"])
    assert logits.shape == (64, 64)
    assert (logits.argmax(1) == batch.labels).float().mean() > 0.5  # chance is 1/64
