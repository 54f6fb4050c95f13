"""POST /v1/classify through the app: both input forms, label sets, templates, and exact logits."""

from __future__ import annotations

import io
import json

import open_clip
import pytest
import torch
from PIL import Image

from server.clip.templates import TEMPLATE_SETS
from tests.support.images import b64, data_uri, png_bytes

LABELS = ["red", "green", "blue", "a cat", "a dog"]


def direct_logits(model_dir, images: list[bytes], labels: list[str], templates: list[str]) -> torch.Tensor:
    """What open_clip computes by itself: CLIP's prompt-ensembled zero-shot logits."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        img = model.encode_image(x)
        img = img / img.norm(dim=-1, keepdim=True)
        weights = []
        for label in labels:
            t = model.encode_text(tokenizer([tp.replace("{}", label) for tp in templates]))
            t = t / t.norm(dim=-1, keepdim=True)
            mean = t.mean(dim=0)
            weights.append(mean / mean.norm())
        return model.logit_scale.exp() * img @ torch.stack(weights).T


def logits_of(body: dict, labels: list[str]) -> torch.Tensor:
    rows = []
    for result in body["results"]:
        by_label = {p["label"]: p["logit"] for p in result["predictions"]}
        rows.append([by_label[label] for label in labels])
    return torch.tensor(rows)


@pytest.mark.parametrize("templates", ["simple", "ensemble7", "openai_imagenet", ["a {} thing.", "art of {}!"]])
def test_logits_equal_a_direct_open_clip_computation(client, tiny_model_dir, templates):
    images = [png_bytes(seed=1), png_bytes((10, 200, 30), size=(50, 30)), png_bytes(seed=2, fmt="JPEG")]
    r = client.post(
        "/v1/classify",
        json={"images": [b64(b) for b in images], "labels": LABELS, "templates": templates, "top_k": len(LABELS)},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    names = templates if isinstance(templates, list) else list(TEMPLATE_SETS[templates])
    expected = direct_logits(tiny_model_dir, images, LABELS, names)
    assert torch.allclose(logits_of(body, LABELS), expected.float(), atol=1e-5, rtol=0)
    for result in body["results"]:
        probs = [p["probability"] for p in result["predictions"]]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert result["label"] == result["predictions"][0]["label"]
        assert result["confidence"] == result["predictions"][0]["probability"]
        assert result["entropy"] > 0


def test_response_shape_top_k_and_timings(client):
    r = client.post(
        "/v1/classify", json={"images": [data_uri(png_bytes()), b64(png_bytes(seed=3))], "labels": LABELS, "top_k": 2}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["method"] == "zero_shot"
    assert body["model"]["id"].startswith("local-dir:")
    assert body["request_id"] == r.headers["x-request-id"]
    assert len(body["results"]) == 2
    assert all(len(res["predictions"]) == 2 for res in body["results"])
    assert set(body["timings"]) == {"decode", "tokenize", "queue", "encode", "classify", "total"}
    assert all(v >= 0 for v in body["timings"].values())


def test_default_top_k_is_capped_by_the_label_count(client):
    r = client.post("/v1/classify", json={"images": [b64(png_bytes())], "labels": ["x", "y"]})
    assert len(r.json()["results"][0]["predictions"]) == 2


def test_results_keep_image_order(client):
    images = [png_bytes(seed=s) for s in range(5)]
    one_by_one = [
        client.post("/v1/classify", json={"images": [b64(b)], "labels": LABELS}).json()["results"][0] for b in images
    ]
    together = client.post("/v1/classify", json={"images": [b64(b) for b in images], "labels": LABELS}).json()
    for alone, batched in zip(one_by_one, together["results"], strict=True):
        assert alone["label"] == batched["label"]
        assert alone["confidence"] == pytest.approx(batched["confidence"], abs=1e-5)


def test_multipart_with_repeated_fields_matches_json(client):
    images = [png_bytes(seed=4), png_bytes(seed=5)]
    files = [("image", ("a.png", images[0], "image/png")), ("image", ("b.png", images[1], "image/png"))]
    form = {"labels": LABELS, "top_k": "5", "templates": "ensemble7"}
    r = client.post("/v1/classify", files=files, data=form)
    assert r.status_code == 200, r.text
    j = client.post(
        "/v1/classify",
        json={"images": [b64(b) for b in images], "labels": LABELS, "top_k": 5, "templates": "ensemble7"},
    )
    assert torch.allclose(logits_of(r.json(), LABELS), logits_of(j.json(), LABELS), atol=1e-6)


def test_multipart_with_json_lists_and_options(client):
    r = client.post(
        "/v1/classify",
        files=[("image", ("a.png", png_bytes(), "image/png"))],
        data={
            "labels": json.dumps(LABELS),
            "templates": json.dumps(["a {} photo."]),
            "method": "zero_shot",
            "options": "{}",
        },
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 1


def test_label_set_with_its_templates_and_an_override(client, tiny_model_dir):
    created = client.post(
        "/v1/label-sets", json={"name": "pets", "labels": ["a cat", "a dog"], "templates": ["a photo of {}, a pet."]}
    )
    assert created.status_code == 201
    image = png_bytes(seed=8)
    r = client.post("/v1/classify", json={"images": [b64(image)], "label_set": "pets"})
    expected = direct_logits(tiny_model_dir, [image], ["a cat", "a dog"], ["a photo of {}, a pet."])
    assert torch.allclose(logits_of(r.json(), ["a cat", "a dog"]), expected.float(), atol=1e-5)
    override = client.post("/v1/classify", json={"images": [b64(image)], "label_set": "pets", "templates": "simple"})
    expected = direct_logits(tiny_model_dir, [image], ["a cat", "a dog"], ["a photo of a {}."])
    assert torch.allclose(logits_of(override.json(), ["a cat", "a dog"]), expected.float(), atol=1e-5)


def test_a_model_label_set_is_usable(client):
    r = client.post("/v1/classify", json={"images": [b64(png_bytes())], "label_set": "tiny-colours"})
    assert r.status_code == 200
    assert {p["label"] for p in r.json()["results"][0]["predictions"]} == {"red", "green", "blue"}


def test_labels_are_whitespace_normalised(client):
    r = client.post("/v1/classify", json={"images": [b64(png_bytes())], "labels": ["  big   cat ", "dog"]})
    assert {p["label"] for p in r.json()["results"][0]["predictions"]} == {"big cat", "dog"}


def test_image_formats_and_modes(client):
    def encode(image: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        return buf.getvalue()

    images = [
        encode(Image.new("RGBA", (20, 30), (1, 2, 3, 100)), "PNG"),
        encode(Image.new("L", (64, 16), 128), "PNG"),
        encode(Image.new("P", (12, 12)), "GIF"),
        encode(Image.new("RGB", (33, 33), (9, 9, 9)), "WEBP"),
        encode(Image.new("CMYK", (20, 20)), "JPEG"),
    ]
    r = client.post("/v1/classify", json={"images": [b64(b) for b in images], "labels": LABELS})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == len(images)


def test_multipart_with_hundreds_of_repeated_label_fields(client):
    labels = [f"class {i}" for i in range(300)]
    r = client.post(
        "/v1/classify", files={"image": ("a.png", png_bytes(), "image/png")}, data={"labels": labels, "top_k": "3"}
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["results"][0]["predictions"]) == 3
