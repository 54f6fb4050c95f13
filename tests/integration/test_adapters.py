"""The adapter registry and serving through adapters, over HTTP: upload, versions, residency, deletion, the
base-model check, adapter_alpha, methods on top of an adapter, routing, and keys that never share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from adapters.fewshot.apply import adapter_class_features, adapter_image_features
from adapters.fewshot.artifact import Adapter, AdapterCard
from server.api import create_app
from server.clip.backbone import Backbone
from server.settings import Settings
from tests.integration.test_auth import ALICE, ALICE_ADMIN, BOB_ADMIN, bearer, keyed
from tests.support.apps import metric, wait_ready
from tests.support.images import b64, png_bytes

LABELS = ["red", "green", "blue", "a cat"]
OCTET = {"content-type": "application/octet-stream"}


def backbone_of(client: TestClient) -> Backbone:
    backbone = client.app.state.runtime.engine.backbone  # type: ignore[attr-defined]
    assert backbone is not None
    return backbone


def image_list(n: int, start: int = 0) -> list[str]:
    return [b64(png_bytes(seed=start + i, size=(40 + i % 5, 36))) for i in range(n)]


def frozen_classes(backbone: Backbone, labels: list[str]) -> torch.Tensor:
    """The labels' zero-shot features as the server builds them with the "simple" template set."""
    with torch.inference_mode():
        return F.normalize(backbone.encode_prompts([f"a photo of a {label}." for label in labels]), dim=-1)


def make_adapter(
    backbone: Backbone,
    parts: tuple[str, ...] = ("text_adapter", "lora"),
    seed: int = 0,
    prototypes: torch.Tensor | None = None,
    base_model: str | None = None,
) -> Adapter:
    """An adapter with random (not trained) parameters for the test model: what serving does with it is the same."""
    gen = torch.Generator().manual_seed(seed)
    dim = backbone.embed_dim
    tensors: dict[str, torch.Tensor] = {
        "label_features": frozen_classes(backbone, LABELS[:2]).clone(),
        "prototypes": prototypes if prototypes is not None else F.normalize(torch.randn(2, dim, generator=gen), dim=-1),
    }
    if "text_adapter" in parts:
        tensors["text.weight"] = torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=gen)
        tensors["text.bias"] = 0.05 * torch.randn(dim, generator=gen)
    if "lora" in parts:
        for i, t in enumerate(backbone.lora_targets().targets):
            tensors[f"lora.{i}.a"] = 0.2 * torch.randn(4, t.in_features, generator=gen)
            tensors[f"lora.{i}.b"] = 0.2 * torch.randn(t.out_features, 4, generator=gen)
    card = AdapterCard(
        type="apex" if parts == ("text_adapter", "lora") else "lora",
        parts=parts,
        base_model=base_model or backbone.fingerprint,
        labels=tuple(LABELS[:2]),
        lora_alpha=8.0,
    )
    return Adapter(card, tensors)


def upload(client: TestClient, adapter: Adapter | bytes, name: str, headers: dict[str, str] | None = None,
           **params: str) -> Any:  # fmt: skip
    data = adapter if isinstance(adapter, bytes) else adapter.to_bytes()
    return client.post(
        "/v1/adapters", params={"name": name, **params}, content=data, headers={**OCTET, **(headers or {})}
    )


def classify(client: TestClient, images: list[str], headers: dict[str, str] | None = None, **extra: Any) -> Any:
    body = {"images": images, "labels": LABELS, "top_k": len(LABELS), **extra}
    return client.post("/v1/classify", json=body, headers=headers)


def logits(result: dict[str, Any]) -> list[float]:
    by_label = {p["label"]: p["logit"] for p in result["predictions"]}
    return [by_label[label] for label in LABELS]


def test_an_uploaded_adapter_is_versioned_listed_served_and_deleted(client: TestClient) -> None:
    backbone = backbone_of(client)
    adapter = make_adapter(backbone)
    first = upload(client, adapter, "shapes", group="g1")
    assert first.status_code == 201, first.text
    assert (first.json()["ref"], first.json()["parts"], first.json()["group"]) == (
        "shapes@v1",
        ["text_adapter", "lora"],
        "g1",
    )
    assert upload(client, make_adapter(backbone, seed=1), "shapes").json()["version"] == 2
    listed = client.get("/v1/adapters").json()
    assert [(a["ref"], a["resident"]) for a in listed["adapters"]] == [("shapes@v1", False), ("shapes@v2", False)]
    assert client.get("/v1/models").json()["models"][0]["fingerprint"] == backbone.fingerprint

    images = image_list(3)
    served = classify(client, images, adapter="shapes@v1", compare=True)
    assert served.status_code == 200, served.text
    result = served.json()["results"][0]
    assert result["adapter"] == {"adapter": "shapes@v1", "alpha": 1.0, "routed": None, "best_similarity": None}
    # What the server answers is what the adapter gives, computed here from the object that was uploaded.
    with torch.inference_mode():
        preprocessed = torch.stack([backbone.preprocess(_pil(i)) for i in range(3)])
        feats = adapter_image_features(backbone, adapter, preprocessed)
        classes = adapter_class_features(backbone, adapter, LABELS, frozen_classes(backbone, LABELS))
        expected = backbone.logit_scale * feats @ classes.T
    for i, r in enumerate(served.json()["results"]):
        assert logits(r) == pytest.approx(expected[i].tolist(), abs=1e-4)
    assert logits(result) != pytest.approx(
        [p["logit"] for p in sorted(result["zero_shot"]["predictions"], key=lambda p: LABELS.index(p["label"]))],
        abs=1e-3,
    )
    assert client.get("/v1/adapters/shapes@v1").json()["resident"] is True
    assert client.get("/v1/adapters/shapes").json()["version"] == 2  # the newest

    download = client.get("/v1/adapters/shapes@v1/artifact")
    assert download.status_code == 200 and download.content == adapter.to_bytes()

    assert client.delete("/v1/adapters/shapes@v1").status_code == 204
    gone = classify(client, images, adapter="shapes@v1")
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "unknown_adapter")
    assert classify(client, images, adapter="shapes").status_code == 200  # v2 remains
    assert client.delete("/v1/adapters/shapes").status_code == 204
    assert client.get("/v1/adapters").json()["adapters"] == []


def _pil(i: int) -> Any:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png_bytes(seed=i, size=(40 + i % 5, 36)))).convert("RGB")


def test_adapter_alpha_zero_is_exactly_zero_shot_and_alpha_moves_toward_the_adapter(client: TestClient) -> None:
    upload(client, make_adapter(backbone_of(client)), "a")
    images = image_list(2)
    zero_shot = [logits(r) for r in classify(client, images).json()["results"]]
    at = {
        alpha: [logits(r) for r in classify(client, images, adapter="a", adapter_alpha=alpha).json()["results"]]
        for alpha in (0.0, 0.5, 1.0)
    }
    assert at[0.0] == zero_shot  # bit for bit
    for i in range(2):
        to_half = torch.tensor(at[0.5][i]) - torch.tensor(zero_shot[i])
        to_full = torch.tensor(at[1.0][i]) - torch.tensor(zero_shot[i])
        assert 0 < to_half.norm() < to_full.norm()
    alone = classify(client, images, adapter_alpha=0.5)
    assert (alone.status_code, alone.json()["error"]["code"]) == (422, "adapter_alpha_without_adapter")


def test_an_artifact_for_another_model_or_not_an_artifact_is_refused(client: TestClient) -> None:
    backbone = backbone_of(client)
    foreign = upload(client, make_adapter(backbone, base_model="0123456789abcdef"), "foreign")
    assert foreign.status_code == 409
    error = foreign.json()["error"]
    assert error["code"] == "adapter_base_model"
    assert "0123456789abcdef" in error["message"] and backbone.fingerprint in error["message"]
    garbage = upload(client, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"x" * 64, "junk")
    assert (garbage.status_code, garbage.json()["error"]["code"]) == (422, "invalid_adapter")
    plain = client.post("/v1/adapters", params={"name": "x"}, json={"a": 1})
    assert plain.status_code == 415
    bad_name = upload(client, make_adapter(backbone), "no spaces")
    assert (bad_name.status_code, bad_name.json()["error"]["code"]) == (422, "invalid_name")
    bad_ref = classify(client, image_list(1), adapter="a@version2")
    assert (bad_ref.status_code, bad_ref.json()["error"]["code"]) == (422, "invalid_adapter_ref")


def test_methods_adapt_on_top_of_an_adapter_unless_they_would_bypass_it(client: TestClient) -> None:
    backbone = backbone_of(client)
    upload(client, make_adapter(backbone), "apex")
    upload(client, make_adapter(backbone, parts=("lora",)), "vision")
    images = image_list(2)
    on_top = classify(client, images, adapter="apex", method="mta", seed=3)
    assert on_top.status_code == 200, on_top.text
    assert on_top.json()["results"][0]["adaptation"]["steps"] > 0
    for method, adapter in (("tpt", "apex"), ("ttl", "vision")):
        refused = classify(client, images, adapter=adapter, method=method, options={"steps": 1})
        assert (refused.status_code, refused.json()["error"]["code"]) == (422, "adapter_method"), method
    assert classify(client, images, adapter="vision", method="tpt", options={"steps": 1}).status_code == 200


def test_routing_sends_each_image_to_the_adapter_whose_prototypes_it_is_near_and_falls_back_alone(
    client: TestClient,
) -> None:
    backbone = backbone_of(client)
    near_a, near_b = image_list(2, start=0), image_list(2, start=50)
    with torch.inference_mode():
        feats = backbone.encode_images(torch.stack([backbone.preprocess(_pil(i)) for i in (0, 1, 50, 51)]))
    upload(client, make_adapter(backbone, seed=1, prototypes=feats[:2].clone()), "a", group="g")
    upload(client, make_adapter(backbone, seed=2, prototypes=feats[2:].clone()), "b", group="g")
    routed = classify(client, near_a + near_b, adapter={"route": "auto", "top_k": 1, "group": "g"})
    assert routed.status_code == 200, routed.text
    used = [[u["adapter"] for u in r["adapter"]["routed"]] for r in routed.json()["results"]]
    assert used == [["a@v1"], ["a@v1"], ["b@v1"], ["b@v1"]]
    text = client.get("/metrics").text
    assert metric(text, 'tta_routed_images_total{outcome="adapter"}') == 4
    assert metric(text, "tta_adapter_loads_total") == 2 and metric(text, "tta_adapter_resident_bytes") > 0
    assert all(
        r["adapter"]["routed"][0]["similarity"] == pytest.approx(1.0, abs=1e-4) for r in routed.json()["results"]
    )

    far = image_list(2, start=100)  # like neither adapter's images
    zero_shot = [logits(r) for r in classify(client, far).json()["results"]]
    for route in ({"min_sim": 0.9999, "group": "g"}, {"group": "nobody"}):
        alone = classify(client, far, adapter={"route": "auto", "top_k": 2, **route}).json()["results"]
        assert [r["adapter"]["routed"] for r in alone] == [[], []]
        for served, frozen in zip(alone, zero_shot, strict=True):
            assert logits(served) == pytest.approx(frozen, abs=1e-5)
    refused = classify(client, near_a, adapter={"route": "auto"}, method="mta")
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "adapter_method")


@pytest.fixture
def keyed_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(keyed(settings)), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


def test_each_key_sees_and_serves_its_own_adapters_only(keyed_client: TestClient) -> None:
    backbone = backbone_of(keyed_client)
    assert upload(keyed_client, make_adapter(backbone), "mine", headers=bearer(ALICE_ADMIN)).status_code == 201
    assert upload(keyed_client, make_adapter(backbone), "mine", headers=bearer(ALICE)).status_code == 403
    assert keyed_client.get("/v1/adapters", headers=bearer(BOB_ADMIN)).json()["adapters"] == []
    theirs = classify(keyed_client, image_list(1), headers=bearer(BOB_ADMIN), adapter="mine")
    assert (theirs.status_code, theirs.json()["error"]["code"]) == (404, "unknown_adapter")
    ours = classify(keyed_client, image_list(1), headers=bearer(ALICE), adapter="mine")
    assert ours.status_code == 200
    assert keyed_client.delete("/v1/adapters/mine", headers=bearer(BOB_ADMIN)).status_code == 404


def test_a_group_merges_into_a_servable_adapter_with_each_member_rebuilt(client: TestClient) -> None:
    backbone = backbone_of(client)
    upload(client, make_adapter(backbone, seed=1), "a", group="g")
    upload(client, make_adapter(backbone, seed=2), "b", group="g")
    merged = client.post("/v1/adapter-groups/g/merge", json={"method": "emr"})
    assert merged.status_code == 201, merged.text
    body = merged.json()
    assert body["unified"]["ref"] == "g.merged@v1" and body["unified"]["type"] == "merged"
    assert body["unified"]["source"] == "merge:g" and body["unified"]["group"] is None  # not a member of its group
    assert [(m["adapter"], m["reconstruction"]) for m in body["members"]] == [("a@v1", "g.a@v1"), ("b@v1", "g.b@v1")]
    assert all(0 < m["fidelity"] <= 1 and 0 < m["mask_density"] <= 1 for m in body["members"])
    images = image_list(2)
    for adapter in ("g.merged", "g.a@v1", "g.b"):
        assert classify(client, images, adapter=adapter).status_code == 200, adapter

    again = client.post("/v1/adapter-groups/g/merge", json={"method": "emr"}).json()  # from the originals again
    assert again["unified"]["ref"] == "g.merged@v2"  # the unified adapter is not a member: the same merge again
    assert [(m["fidelity"], m["rescaler"]) for m in again["members"]] == [
        (m["fidelity"], m["rescaler"]) for m in body["members"]
    ]
    ties = client.post("/v1/adapter-groups/g/merge", json={"method": "ties", "name": "g.ties"}).json()
    assert [m["reconstruction"] for m in ties["members"]] == [None, None]

    upload(client, make_adapter(backbone, seed=3), "solo", group="one")
    alone = client.post("/v1/adapter-groups/one/merge", json={}).json()
    assert alone["members"][0]["fidelity"] == pytest.approx(1.0) and alone["members"][0]["rescaler"] == 1.0
    original = [logits(r) for r in classify(client, images, adapter="solo").json()["results"]]
    rebuilt = [logits(r) for r in classify(client, images, adapter="one.solo").json()["results"]]
    for x, y in zip(original, rebuilt, strict=True):
        assert x == pytest.approx(y, abs=1e-4)

    upload(client, make_adapter(backbone, parts=("lora",)), "other", group="mixed")
    upload(client, make_adapter(backbone), "apex", group="mixed")
    refused = client.post("/v1/adapter-groups/mixed/merge", json={"method": "emr"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "merge_refused")
    empty = client.post("/v1/adapter-groups/nobody/merge", json={"method": "emr"})
    assert (empty.status_code, empty.json()["error"]["code"]) == (404, "unknown_adapter_group")


def test_class_distance_weighs_each_class_by_its_distance_to_the_training_labels(client: TestClient) -> None:
    upload(client, make_adapter(backbone_of(client)), "apex")  # trained (here: made) on LABELS[:2]
    images = image_list(2)

    def served(labels: list[str], alpha: Any) -> list[dict[str, Any]]:
        body = {"images": images, "labels": labels, "top_k": len(labels), "adapter": "apex", "adapter_alpha": alpha}
        answer = client.post("/v1/classify", json=body)
        assert answer.status_code == 200, answer.text
        return list(answer.json()["results"])

    seen = LABELS[:2]
    by_distance, full = served(seen, "class_distance"), served(seen, 1.0)
    assert by_distance[0]["adapter"]["alpha"] == "class_distance"
    for a, b in zip(by_distance, full, strict=True):  # every class was trained on: weight 1, the adapter itself
        assert {p["label"]: p["logit"] for p in a["predictions"]} == pytest.approx(
            {p["label"]: p["logit"] for p in b["predictions"]}, abs=1e-5
        )
    mixed, mixed_full = served(LABELS, "class_distance"), served(LABELS, 1.0)
    assert {p["label"]: p["logit"] for p in mixed[0]["predictions"]} != pytest.approx(
        {p["label"]: p["logit"] for p in mixed_full[0]["predictions"]}, abs=1e-4
    )
    refused = classify(client, images, adapter="apex", adapter_alpha="class_distance", method="mta")
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "adapter_method")


@pytest.mark.parametrize("kind", ["apex", "prompt"])
def test_a_trained_adapter_serves_the_logits_it_had_right_after_training(client: TestClient, kind: str) -> None:
    from adapters.fewshot.train import TrainConfig, train_adapter

    backbone = backbone_of(client)
    support = torch.stack([backbone.preprocess(_pil(i)) for i in range(8)])
    targets = torch.tensor([0, 1] * 4)
    frozen = frozen_classes(backbone, LABELS)
    config = TrainConfig(type=kind, steps=4, lr=3e-3, batch_size=4)
    trained = train_adapter(backbone, support, targets, tuple(LABELS), frozen, config, base_model=backbone.fingerprint)
    with torch.inference_mode():  # what training ends with, before any bytes
        queries = torch.stack([backbone.preprocess(_pil(i)) for i in range(20, 23)])
        feats = adapter_image_features(backbone, trained, queries)
        expected = backbone.logit_scale * feats @ adapter_class_features(backbone, trained, LABELS, frozen).T
    assert upload(client, trained, f"trained-{kind}").status_code == 201
    served = classify(client, image_list(3, start=20), adapter=f"trained-{kind}").json()["results"]
    for i, result in enumerate(served):
        assert logits(result) == pytest.approx(expected[i].tolist(), abs=1e-5)


def test_loaded_adapters_stay_within_their_cache_least_recently_used_out(settings: Settings) -> None:
    with TestClient(create_app(settings), raise_server_exceptions=False) as probe:
        wait_ready(probe)
        one = make_adapter(backbone_of(probe)).nbytes  # an adapter's tensors, loaded
    capped = settings.model_copy(update={"adapter_cache_bytes": int(one * 1.5)})
    with TestClient(create_app(capped), raise_server_exceptions=False) as client:
        wait_ready(client)
        backbone = backbone_of(client)
        for name, seed in (("a", 1), ("b", 2)):
            upload(client, make_adapter(backbone, seed=seed), name)
        images = image_list(1)

        def resident() -> dict[str, bool]:
            return {a["name"]: a["resident"] for a in client.get("/v1/adapters").json()["adapters"]}

        first = logits(classify(client, images, adapter="a").json()["results"][0])
        assert resident() == {"a": True, "b": False}
        classify(client, images, adapter="b")
        assert resident() == {"a": False, "b": True}  # a made room
        assert logits(classify(client, images, adapter="a").json()["results"][0]) == first  # read back the same
        assert metric(client.get("/metrics").text, "tta_adapter_loads_total") == 3
        listed = client.get("/v1/adapters").json()
        assert listed["resident_bytes"] <= listed["cache_bytes"] == int(one * 1.5)


def test_prompt_tuning_continues_from_a_prompt_adapters_learned_context(client: TestClient) -> None:
    """TPT on a prompt adapter starts from its context (the TPT paper's CoOp + TPT): with no step it answers as
    the adapter does; with steps it adapts from there."""
    backbone = backbone_of(client)
    with torch.no_grad():
        start = backbone.prompt_inputs(tuple(LABELS[:2]), "a photo of a").ctx_init
    gen = torch.Generator().manual_seed(4)
    tensors = {
        "label_features": frozen_classes(backbone, LABELS[:2]).clone(),
        "prototypes": F.normalize(torch.randn(2, backbone.embed_dim, generator=gen), dim=-1),
        "prompt.ctx_init": start.clone(),
        "prompt.ctx": start + 0.5 * torch.randn(start.shape, generator=gen),
    }
    card = AdapterCard(type="prompt", parts=("prompt",), base_model=backbone.fingerprint, labels=tuple(LABELS[:2]),
                       ctx_init="a photo of a")  # fmt: skip
    assert upload(client, Adapter(card, tensors), "coop").status_code == 201
    images = image_list(2)
    served = [logits(r) for r in classify(client, images, adapter="coop").json()["results"]]
    plain_tpt = classify(client, images, method="tpt", options={"steps": 0}, seed=1).json()["results"]
    no_step = classify(client, images, adapter="coop", method="tpt", options={"steps": 0}, seed=1)
    assert no_step.status_code == 200, no_step.text
    for got, want, plain in zip(no_step.json()["results"], served, plain_tpt, strict=True):
        assert logits(got) == pytest.approx(want, abs=1e-4)  # the adapter's context, not "a photo of a"
        assert logits(got) != pytest.approx(logits(plain), abs=1e-3)
    stepped = classify(client, images, adapter="coop", method="tpt", options={"steps": 1, "views": 8}, seed=1)
    assert stepped.status_code == 200 and stepped.json()["results"][0]["adaptation"]["steps"] == 1
