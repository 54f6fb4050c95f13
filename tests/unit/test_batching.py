"""Stacked adaptation at the method level: each image as if alone, skipped steps, stopping between steps."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from adapters import AdaptInput, get_method
from adapters.base import Stopped
from adapters.common import optimize
from server.clip import Backbone, load_backbone
from server.clip.probes import ActivationBytes
from server.engine.adaptation import ImageTask, adapt_image, adapt_images
from server.engine.admission import MemoryModel, stack_within
from server.engine.classes import ClassFeatures
from server.settings import Settings

LABEL_SETS = [("red", "green", "blue"), ("a cat", "a dog"), ("a square", "a circle", "a star", "a heart")]


@pytest.fixture(scope="module")
def backbone(tiny_model_dir) -> Backbone:
    return load_backbone(Settings(model=f"local-dir:{tiny_model_dir}", device="cpu", _env_file=None))


def task(backbone: Backbone, i: int) -> ImageTask:
    gen = torch.Generator().manual_seed(100 + i)
    original = torch.randint(0, 256, (3, 40 + i, 36), generator=gen, dtype=torch.uint8)
    base = torch.randn(3, *backbone.image_size, generator=gen)
    labels = LABEL_SETS[i % 3]
    classes = ClassFeatures(backbone, 2**20).get(labels, ("a photo of a {}.",)).clone()
    return ImageTask(original, base, classes, labels, torch.Generator().manual_seed(i))


@pytest.mark.parametrize("method", ["tpt", "ctpt", "tps", "ttl"])
def test_stacked_images_with_different_label_sets_get_their_alone_result(backbone, method):
    impl = get_method(method)
    options = impl.parse_options({"steps": 2, "views": 16})
    alone = [
        adapt_image(backbone, impl, options, t.original, t.base_view, t.classes, t.labels, t.generator)
        for t in (task(backbone, i) for i in range(5))
    ]
    together = adapt_images(backbone, impl, options, [task(backbone, i) for i in range(5)])
    for (la, ra), (lb, rb) in zip(alone, together, strict=True):
        torch.testing.assert_close(lb, la, atol=1e-4, rtol=0)  # the bound on CPU
        assert (ra.steps, ra.selected_views, ra.batch_images, rb.batch_images) == (rb.steps, rb.selected_views, 1, 5)


def test_an_image_that_skips_a_step_is_not_moved_by_weight_decay():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    taken = optimize([[a], [b]], lr=0.1, steps=2, loss_fn=lambda step: [(a * 2).sum(), None])
    assert taken == [2, 0]
    assert torch.equal(b.detach(), torch.ones(3))  # AdamW's decoupled weight decay would have shrunk it
    assert bool((a < 1).all())


def test_work_stops_between_steps_once_nobody_waits(backbone):
    impl = get_method("tps")
    t = task(backbone, 0)
    feats = backbone.encode_images(t.base_view[None].expand(4, -1, -1, -1)).clone()
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 1  # the caller leaves after the first step

    inp = AdaptInput(feats, t.classes, backbone.logit_scale, t.labels, t.generator, backbone, stop=stop)
    with pytest.raises(Stopped, match="before step 2 of 5"):
        impl.adapt(inp, impl.parse_options({"steps": 5, "views": 4}))


def test_stack_within_keeps_order_and_the_budget_and_sets_aside_what_cannot_fit():
    items, needs = list("abcdefg"), [3.0, 3.0, 5.0, 11.0, 1.0, 1.0, 1.0]
    batches, too_big = stack_within(items, needs, budget=10.0, max_items=3)
    assert batches == [["a", "b"], ["c", "e", "f"], ["g"]] and too_big == ["d"]
    for batch in batches:
        assert sum(needs[items.index(x)] for x in batch) <= 10.0 and len(batch) <= 3
    assert stack_within([], [], 1.0, 1) == ([], [])


def test_the_memory_estimate_grows_with_what_a_method_keeps(backbone):
    activations = ActivationBytes.measure(backbone)
    assert activations.image > activations.image_block > 0 and activations.prompt_token > 0
    model = MemoryModel(activations, budget_bytes=2**40)
    few, many = ("red", "green"), tuple(f"colour number {i}" for i in range(200))

    def estimate(method: str, labels: tuple[str, ...], **options) -> float:
        m = get_method(method)
        return model.image_bytes(backbone, m, m.parse_options(options), labels)

    assert estimate("tpt", many) > estimate("tpt", few)  # TPT keeps every class's prompt for its backward pass
    assert estimate("zero", many) == estimate("zero", few)
    assert estimate("ttl", few, views=32) < estimate("ttl", few)
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch.distributed objects warns of deprecations
        warnings.simplefilter("ignore")
        kept = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.requires_grad]
    assert kept == []  # the measuring left no graph behind
