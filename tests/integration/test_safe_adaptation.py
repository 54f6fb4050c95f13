"""The ensemble with zero-shot, the anchor regularizers and class descriptions, through HTTP."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from PIL import Image

from adapters.ensemble import DEFAULT_GUARD
from server.clip.templates import describe
from tests.support.images import b64, png_bytes

LABELS = ["red", "green", "blue", "a cat", "a dog"]
DESCRIPTIONS = {"red": ["a warm colour like blood"], "a cat": ["has whiskers", "small furry pet"]}
IMAGES = [b64(png_bytes(seed=1, size=(70, 50))), b64(png_bytes(seed=2))]


def classify(client, method: str, options: dict | None = None, **extra):
    body = {
        "images": IMAGES,
        "labels": LABELS,
        "method": method,
        "top_k": len(LABELS),
        "templates": "simple",
        "seed": 7,
        **extra,
    }
    if options is not None:
        body["options"] = options
    return client.post("/v1/classify", json=body)


def ok(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["results"]


def logits(result: dict, key: str = "predictions", field: str = "logit") -> dict[str, float]:
    """Each label's ``field`` in the result's predictions, or (``key="zero_shot"``) in its zero-shot view."""
    predictions = result["zero_shot"]["predictions"] if key == "zero_shot" else result["predictions"]
    return {p["label"]: p[field] for p in predictions}


def refused(response, *words: str) -> str:
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, message
    return message


def described_set(client, name: str = "described") -> str:
    r = client.post(
        "/v1/label-sets",
        json={"name": name, "labels": LABELS, "templates": "simple", "descriptions": DESCRIPTIONS},
    )
    assert r.status_code == 201, r.text
    return name


# -- the ensemble ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tpt", "tps", "mta"])
def test_ensemble_off_is_bit_identical_to_no_ensemble(client, method):
    strong = {"lr": 0.5} if method != "mta" else {}
    plain = ok(classify(client, method, strong))
    off = ok(classify(client, method, strong | {"ensemble": {"mode": "off", "weight": 0.3}}))
    for a, b in zip(plain, off, strict=True):
        assert a["predictions"] == b["predictions"]  # every logit and probability, to the last bit
        assert (a["confidence"], a["entropy"]) == (b["confidence"], b["entropy"])
        assert b["adaptation"]["ensemble"] is None


def test_fixed_weights_blend_the_adapted_and_the_zero_shot_logits(client):
    adapted = ok(classify(client, "tpt", {"lr": 0.5}, compare=True))
    blends = {
        w: ok(classify(client, "tpt", {"lr": 0.5, "ensemble": {"mode": "fixed", "weight": w}}, compare=True))
        for w in (0.0, 0.3, 1.0)
    }
    for i, result in enumerate(adapted):
        zs, ad = logits(result, "zero_shot"), logits(result)
        assert ad != pytest.approx(zs, abs=1e-3)  # the adaptation moved the logits: the blend is visible
        for w, results in blends.items():
            got = results[i]
            assert logits(got) == pytest.approx({k: w * ad[k] + (1 - w) * zs[k] for k in LABELS}, abs=1e-4)
            assert got["adaptation"]["ensemble"]["weight"] == w
            assert 0.0 <= got["adaptation"]["ensemble"]["difficulty"] <= 1.0
        # Weight 0 is the zero-shot answer, calibrated after the blend exactly as zero-shot is.
        for field in ("probability", "score"):
            assert logits(blends[0.0][i], field=field) == pytest.approx(logits(result, "zero_shot", field), abs=1e-5)
        assert blends[0.0][i]["confidence"] == pytest.approx(result["zero_shot"]["confidence"], abs=1e-5)


def test_adaptive_weight_follows_the_zero_shot_difficulty(client):
    images = [b64(png_bytes(seed=s, size=(40 + 3 * s, 44))) for s in range(6)]
    base = {"lr": 0.5}
    adapted = ok(classify(client, "tpt", base, compare=True, images=images))
    a, b = 0.6, 0.1
    unguarded = {"mode": "adaptive", "a": a, "b": b, "guard": 0}
    mixed = ok(classify(client, "tpt", base | {"ensemble": unguarded}, images=images))
    guarded = ok(classify(client, "tpt", base | {"ensemble": {"mode": "adaptive", "a": a, "b": b}}, images=images))
    seen = []
    for plain, got, held in zip(adapted, mixed, guarded, strict=True):
        report = got["adaptation"]["ensemble"]
        d, w, k = report["difficulty"], report["weight"], report["divergence"]
        assert report["mode"] == "adaptive" and 0.0 <= d <= 1.0 and k >= 0.0
        assert w == pytest.approx(1 / (1 + math.exp(-(d - a) / b)), rel=1e-9)
        zs, ad = logits(plain, "zero_shot"), logits(plain)
        assert logits(got) == pytest.approx({k: w * ad[k] + (1 - w) * zs[k] for k in LABELS}, abs=1e-4)
        seen.append((d, w))
        # The default divergence guard: the weight shrinks by exp(-KL(adapted || zero-shot) / guard).
        same = held["adaptation"]["ensemble"]
        assert same["difficulty"] == d and same["divergence"] == pytest.approx(k, rel=1e-6)
        assert same["weight"] == pytest.approx(w * math.exp(-k / DEFAULT_GUARD), rel=1e-6)
    seen.sort()
    assert all(w1 <= w2 for (_, w1), (_, w2) in itertools.pairwise(seen))  # harder: more adapted


def test_class_distance_needs_an_adapter_and_zero_has_no_ensemble(client):
    refused(classify(client, "tpt", {"ensemble": {"mode": "adaptive", "policy": "class_distance"}}), "adapter_alpha")
    refused(classify(client, "zero", {"ensemble": {"mode": "fixed"}}), "ensemble")
    refused(classify(client, "zero_shot", {"ensemble": {"mode": "fixed"}}), "ensemble")
    refused(classify(client, "tpt", {"ensemble": {"mode": "sometimes"}}), "ensemble.mode")
    refused(classify(client, "tpt", {"ensemble": {"mode": "fixed", "weight": 2}}), "weight")
    refused(classify(client, "tpt", {"ensemble": {"mode": "fixed", "weight": True}}), "weight")
    refused(classify(client, "tpt", {"ensemble": {"mood": "fixed"}}), "mood")


# -- the anchor regularizers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kinds", "options"),
    [
        ("tpt", ("feature", "l2sp"), {"lr": 0.5}),
        ("tps", ("feature", "l2sp"), {"lr": 0.5}),
        ("ttl", ("feature", "anchor_kl", "l2sp"), {"lr": 0.05}),
    ],
)
def test_regularizers_act_from_the_second_step(client, method, kinds, options):
    one = ok(classify(client, method, options | {"steps": 1}))
    three = ok(classify(client, method, options | {"steps": 3}))
    for kind in kinds:
        # One step: the regularizer's gradient at the start is zero, so the step is the same.
        got = ok(classify(client, method, options | {"steps": 1, "regularizers": {kind: 1000.0}}))
        for a, b in zip(one, got, strict=True):
            assert logits(a) == pytest.approx(logits(b), abs=1e-5), kind
        # Three steps: it holds the adapted features near the frozen ones.
        held = ok(classify(client, method, options | {"steps": 3, "regularizers": {kind: 1000.0}}))
        for free, kept in zip(three, held, strict=True):
            assert free["adaptation"]["drift"] > 0
            assert kept["adaptation"]["drift"] < free["adaptation"]["drift"], kind


def test_a_regularizer_a_method_cannot_use_is_refused_saying_why(client):
    refused(classify(client, "tpt", {"regularizers": {"anchor_kl": 1.0}}), "anchor_kl", "tpt", "prompt context")
    refused(classify(client, "mta", {"regularizers": {"feature": 1.0}}), "mta")
    refused(classify(client, "zero", {"regularizers": {"feature": 1.0}}), "regularizers")
    refused(classify(client, "tpt", {"regularizers": {"feature": -1.0}}), "regularizers.feature")


def test_methods_list_the_groups_and_say_the_regularizers_act_from_the_second_step(client):
    listed = {m["name"]: m["options_schema"] for m in client.get("/v1/methods").json()["methods"]}
    for name in ("tpt", "ctpt", "tps", "ttl"):
        schema = listed[name]
        assert {"ensemble", "regularizers", "descriptions"} <= set(schema["properties"])
        assert "second step" in schema["$defs"]["RegularizerOptions"]["description"]
    assert "ensemble" in listed["mta"]["properties"] and "regularizers" not in listed["mta"]["properties"]
    assert set(listed["zero_shot"]["properties"]) == {"descriptions"}
    assert listed["tps"]["properties"]["descriptions"]["default"]["mix"] == 0.5
    assert listed["tpt"]["properties"]["descriptions"]["default"]["mix"] == 0.0


# -- descriptions ---------------------------------------------------------------------------------


def test_every_method_has_the_description_head(client):
    name = described_set(client)
    image = png_bytes(seed=1, size=(70, 50))
    body = {"images": [b64(image)], "label_set": name, "top_k": len(LABELS), "seed": 3}
    backbone = client.app.state.runtime.engine.backbone
    feat = backbone.encode_images(backbone.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None])[0]
    plain = client.post("/v1/classify", json=body | {"method": "zero_shot"}).json()["results"][0]
    for mix in (0.25, 1.0):
        options = {"descriptions": {"mix": mix}}
        zs = client.post("/v1/classify", json=body | {"method": "zero_shot", "options": options}).json()
        # Prompt tuning applies the same head to its re-encoded prompts: zero steps are zero-shot.
        tpt = client.post("/v1/classify", json=body | {"method": "tpt", "options": options | {"steps": 0}}).json()
        for label in LABELS:
            template = backbone.encode_prompts([f"a photo of a {label}."])[0]
            if label in DESCRIPTIONS:
                described = backbone.encode_prompts([describe(label, d) for d in DESCRIPTIONS[label]]).mean(0)
                head = torch.nn.functional.normalize((1 - mix) * template + mix * described, dim=-1)
            else:
                head = template
            expected = backbone.logit_scale * float(feat @ head)
            assert logits(zs["results"][0])[label] == pytest.approx(expected, abs=1e-4)
            assert logits(tpt["results"][0])[label] == pytest.approx(expected, abs=1e-4)
        assert logits(zs["results"][0])["a cat"] != pytest.approx(logits(plain)["a cat"], abs=1e-3)


def test_consistency_acts_from_the_first_step_with_its_weight(client):
    name = described_set(client)
    body = {"images": IMAGES[:1], "label_set": name, "top_k": len(LABELS), "seed": 3, "method": "tpt"}

    def tpt(**descriptions):
        options = {"lr": 0.05, "steps": 1} | ({"descriptions": descriptions} if descriptions else {})
        return ok(client.post("/v1/classify", json=body | {"options": options}))[0]

    free = tpt()
    # Unlike the anchor regularizers, its gradient at the start is not zero: one step differs.
    assert logits(tpt(consistency=True)) != pytest.approx(logits(free), abs=1e-4)
    assert logits(tpt(consistency=True, consistency_weight=0.0)) == logits(free)


def test_consistency_is_refused_where_it_cannot_act(client):
    name = described_set(client)
    body = {"images": IMAGES[:1], "label_set": name, "top_k": len(LABELS)}
    on = {"descriptions": {"consistency": True}}
    for method in ("ttl", "tps", "mta", "zero", "zero_shot"):
        r = client.post("/v1/classify", json=body | {"method": method, "options": on})
        refused(r, "never changes the text embeddings", "tpt")
    r = classify(client, "tpt", on)  # inline labels: no descriptions to be consistent with
    assert refused(r, "label_set") and r.json()["error"]["code"] == "invalid_options"
