"""Few-shot adapter training (adapters/fewshot/train.py) and its application (apply.py) on the demo model.

The label set is the demo's 64 classes; the support set is 10 shots of each of the two held-out
compositions zero-shot gets least right (pink hexagon, cyan diamond).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapters import Stopped
from adapters.fewshot.apply import adapter_class_features, adapter_image_features
from adapters.fewshot.artifact import TYPES, Adapter, AdapterCard
from adapters.fewshot.train import Anchors, Pairs, TrainConfig, retrieve, train_adapter
from benchmarks._lib import synthetic
from server.clip import Backbone, load_backbone
from server.settings import Settings

DEMO = Path(__file__).resolve().parents[2] / "server" / "models" / "demo"
NEW = [62, 37]  # pink hexagon, cyan diamond
LABELS = tuple(synthetic.CLASS_NAMES)
ATOL = 1e-5  # the LoRA suffix against encode_image (tests/unit/test_lowrank.py)


@dataclass
class Demo:
    backbone: Backbone
    classes: torch.Tensor  # [64, D] template-ensemble features
    images: torch.Tensor  # [20, 3, 64, 64] preprocessed support images
    targets: torch.Tensor  # [20]
    captions: list[str]


def preprocess(images: torch.Tensor) -> torch.Tensor:
    return (images - 0.5) / 0.25  # the demo's mean and std


@pytest.fixture(scope="module")
def demo() -> Demo:
    if not (DEMO / "open_clip_config.json").is_file():
        pytest.skip("the demo model is not in this checkout")
    torch.manual_seed(0)
    backbone = load_backbone(Settings(model=f"local-dir:{DEMO}", device="cpu", _env_file=None))
    per = [backbone.encode_prompts([t.format(label) for label in LABELS]) for t in synthetic.TEMPLATES]
    classes = F.normalize(torch.stack(per).mean(0), dim=-1)
    gen = torch.Generator().manual_seed(5)
    batch = synthetic.render(synthetic.sample_attributes(200, NEW, gen), gen)
    idx = torch.cat([(batch.labels == c).nonzero().flatten()[:10] for c in NEW])
    return Demo(backbone, classes, preprocess(batch.images[idx]), batch.labels[idx], [batch.captions[i] for i in idx])


def train(demo: Demo, **overrides: object) -> Adapter:
    config = TrainConfig(**{"steps": 20, "lr": 3e-3, **overrides})  # type: ignore[arg-type]
    return train_adapter(demo.backbone, demo.images, demo.targets, LABELS, demo.classes, config, base_model="demo")


def features(demo: Demo, adapter: Adapter, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        adapter_image_features(demo.backbone, adapter, images),
        adapter_class_features(demo.backbone, adapter, LABELS, demo.classes),
    )


@pytest.mark.parametrize("kind", list(TYPES))
def test_training_raises_support_accuracy_on_new_classes(demo: Demo, kind: str) -> None:
    adapter = train(demo, type=kind)
    before, after = adapter.card.metrics["support_accuracy_before"], adapter.card.metrics["support_accuracy_after"]
    assert before < 0.9  # the new compositions are often confused zero-shot
    assert after > before
    images, classes = features(demo, adapter, demo.images)
    assert float(((images @ classes.T).argmax(1) == demo.targets).float().mean()) == pytest.approx(after)
    assert adapter.card.parts == TYPES[kind] and adapter.card.base_model == "demo"
    assert adapter.card.training["shots"] == 20 and adapter.card.training["shots_per_class"][62] == 10
    assert torch.equal(adapter.tensors["label_features"], demo.classes)


@pytest.mark.parametrize("kind", list(TYPES))
def test_an_artifact_round_trip_gives_identical_features(demo: Demo, kind: str) -> None:
    adapter = train(demo, type=kind, steps=5)
    loaded = Adapter.from_bytes(adapter.to_bytes())
    assert loaded.card == adapter.card
    for got, want in zip(features(demo, loaded, demo.images), features(demo, adapter, demo.images), strict=True):
        assert torch.equal(got, want)


def test_the_same_seed_gives_the_same_adapter_and_the_model_never_changes(demo: Demo) -> None:
    weights = demo.backbone.measure_fingerprint()
    first, again, other = train(demo, steps=8), train(demo, steps=8), train(demo, steps=8, seed=1)
    assert demo.backbone.measure_fingerprint() == weights
    assert first.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    assert not torch.equal(first.tensors["lora.0.a"], other.tensors["lora.0.a"])


def test_an_adapter_at_its_starting_point_gives_the_frozen_features(demo: Demo) -> None:
    trained = train(demo, type="lora", steps=1)
    prompt = train(demo, type="prompt", steps=1)
    dim = demo.classes.shape[1]
    start = {k: v for k, v in trained.tensors.items() if not k.endswith(".b")}
    start |= {k: torch.zeros_like(v) for k, v in trained.tensors.items() if k.endswith(".b")}  # B = 0
    start |= {"text.weight": torch.eye(dim), "text.bias": torch.zeros(dim)}
    start |= {"prompt.ctx": prompt.tensors["prompt.ctx_init"], "prompt.ctx_init": prompt.tensors["prompt.ctx_init"]}
    card = AdapterCard("merged", ("prompt", "text_adapter", "lora"), "demo", LABELS, ctx_init="a photo of a")
    images, classes = features(demo, Adapter(card, start), demo.images)
    assert torch.allclose(images, demo.backbone.encode_images(demo.images), atol=ATOL)
    one_template = demo.backbone.encode_prompts([f"a photo of a {label}." for label in LABELS])
    assert torch.allclose(classes, one_template, atol=ATOL)
    apex = Adapter(AdapterCard("apex", ("text_adapter", "lora"), "demo", LABELS), start)
    assert torch.allclose(features(demo, apex, demo.images)[1], demo.classes, atol=1e-6)


def test_stop_ends_training_and_progress_reports_every_step(demo: Demo) -> None:
    seen: list[tuple[int, int, float, float]] = []
    config = TrainConfig(steps=50)
    with pytest.raises(Stopped):
        train_adapter(
            demo.backbone, demo.images, demo.targets, LABELS, demo.classes, config, base_model="demo",
            progress=lambda *report: seen.append(report), stop=lambda: len(seen) >= 3,
        )  # fmt: skip
    assert [(s, n) for s, n, _, _ in seen] == [(1, 50), (2, 50), (3, 50)]
    assert all(loss > 0 and elapsed >= 0 for _, _, loss, elapsed in seen)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("type", "vpt", "type must be one of prompt, apex, lora"),
        ("steps", 0, "steps must be between 1"),
        ("lr", 0.0, "lr must be above 0"),
        ("batch_size", 0, "batch_size must be between 1"),
        ("lora_rank", 0, "lora_rank must be between 1"),
        ("ctx_init", " ", "ctx_init must be a non-empty text"),
        ("label_smoothing", 1.0, "label_smoothing must be at least 0 and below 1"),
        ("tca_weight", -1.0, "tca_weight must be between 0"),
        ("retrieve_k", 2.5, "retrieve_k must be a whole number"),
        ("steps", "10", "steps must be a whole number"),
        ("tca_weight", "1", "tca_weight must be a number"),
    ],
)
def test_a_bad_config_is_refused_with_the_reason(field: str, value: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_inputs_that_do_not_fit_are_refused(demo: Demo) -> None:
    with pytest.raises(ValueError, match="targets must index the 2 labels"):
        train_adapter(
            demo.backbone, demo.images, demo.targets, LABELS[:2], demo.classes[:2], TrainConfig(), base_model="x"
        )
    with pytest.raises(ValueError, match="anchor text_features have shape"):
        Pairs(demo.images, tuple(demo.captions), demo.classes[:3])


def test_retrieve_picks_each_querys_nearest_pool_items_once() -> None:
    pool = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]]), dim=-1)
    queries = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 0.0]]), dim=-1)
    assert retrieve(queries, pool, 2).tolist() == [0, 1, 2, 3]  # the third query's neighbours are already in
    assert retrieve(queries, pool, 0).tolist() == []


def test_retrieved_anchors_are_the_support_sets_neighbours_and_change_training(demo: Demo) -> None:
    gen = torch.Generator().manual_seed(9)
    pool = synthetic.render(synthetic.sample_attributes(120, synthetic.SEEN, gen), gen)
    pairs = Pairs(preprocess(pool.images), tuple(pool.captions), demo.backbone.encode_prompts(pool.captions))
    config = TrainConfig(steps=10, retrieve_k=2, tca_weight=1.0, ita_weight=1.0)
    captions = Pairs(demo.images, tuple(demo.captions), demo.backbone.encode_prompts(demo.captions))
    anchored = train_adapter(
        demo.backbone, demo.images, demo.targets, LABELS, demo.classes, config, base_model="demo",
        anchors=Anchors(captions=captions, pool=pairs),
    )  # fmt: skip
    chosen = retrieve(demo.backbone.encode_images(demo.images), demo.backbone.encode_images(pairs.images), 2)
    assert anchored.card.training["retrieved_anchors"] == chosen.numel() <= 40
    assert anchored.card.training["caption_anchors"] == 20 and anchored.card.training["pool_size"] == 120
    # Neighbours of pink hexagons and cyan diamonds share a colour or a shape with them far more than chance.
    shares = [(pool.colour[i] in (7, 4)) or (pool.shape[i] in (6, 5)) for i in chosen.tolist()]
    assert sum(shares) / len(shares) > 0.6
    plain = train(demo, steps=10, lr=TrainConfig().lr)
    assert not torch.equal(plain.tensors["text.weight"], anchored.tensors["text.weight"])
