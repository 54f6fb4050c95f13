"""Every test-time method through HTTP: contracts, seeding, reports, calibration, limits and metrics."""

from __future__ import annotations

import gc
import io
import json
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from adapters import method_names
from server.api import create_app
from server.clip import load_backbone
from server.clip.templates import describe
from server.service.confidence import ConfidenceModel
from tests.support.apps import state_hash, wait_ready
from tests.support.images import b64, png_bytes
from tests.support.requests import STRONG

LABELS = ["red", "green", "blue", "a cat", "a dog"]
ADAPTIVE = [m for m in method_names() if m != "zero_shot"]
# Options under which each method must reduce to plain zero-shot.
NO_OP = {
    "tpt": {"steps": 0},
    "ctpt": {"steps": 0},
    "tps": {"steps": 0},
    "zero": {"views": 1},
    "mta": {"iterations": 0},
    "ttl": {"steps": 0},
}


def classify(client, method: str, seed: int | None = 7, images=None, **extra):
    body = {
        "images": images or [b64(png_bytes(seed=1, size=(70, 50))), b64(png_bytes(seed=2))],
        "labels": LABELS,
        "method": method,
        "top_k": len(LABELS),
        "templates": "simple",
        **extra,
    }
    if seed is not None:
        body["seed"] = seed
    return client.post("/v1/classify", json=body)


def logits(result: dict) -> dict[str, float]:
    return {p["label"]: p["logit"] for p in result["predictions"]}


def test_every_method_is_listed_with_its_options(client):
    listed = {m["name"]: m for m in client.get("/v1/methods").json()["methods"]}
    assert set(listed) == set(method_names())
    assert {"tpt", "ctpt", "tps", "zero", "mta"} <= set(listed)
    assert listed["tpt"]["options_schema"]["properties"]["lr"]["default"] == 5e-3
    assert listed["ctpt"]["options_schema"]["properties"]["dispersion_weight"]["default"] == 50.0


@pytest.mark.parametrize("method", ADAPTIVE)
def test_no_op_options_equal_zero_shot(client, method):
    reference = classify(client, "zero_shot").json()["results"]
    r = classify(client, method, options=NO_OP[method])
    assert r.status_code == 200, r.text
    for ours, zs in zip(r.json()["results"], reference, strict=True):
        assert ours["label"] == zs["label"]
        a, b = logits(ours), logits(zs)
        assert all(abs(a[k] - b[k]) < 1e-5 for k in LABELS)
        assert ours["adaptation"]["changed"] is False


@pytest.mark.parametrize("method", ADAPTIVE)
def test_same_seed_same_result_alone_or_amid_traffic(client, method):
    alone = classify(client, method, seed=11).json()["results"]
    again = classify(client, method, seed=11).json()["results"]
    assert [r["predictions"] for r in alone] == [r["predictions"] for r in again]
    others = [(m, s) for m in method_names() for s in (1, 2)]
    with ThreadPoolExecutor(6) as pool:
        mine = pool.submit(classify, client, method, 11)
        noise = [pool.submit(classify, client, m, s) for m, s in others]
        crowded = mine.result().json()["results"]
        assert all(f.result().status_code == 200 for f in noise)
    for a, b in zip(alone, crowded, strict=True):
        assert a["label"] == b["label"]
        assert all(abs(logits(a)[k] - logits(b)[k]) < 1e-5 for k in LABELS)


def test_seed_changes_the_views(client):
    a = classify(client, "tps", seed=1, options={"lr": 0.5}).json()["results"][0]
    b = classify(client, "tps", seed=2, options={"lr": 0.5}).json()["results"][0]
    assert a["adaptation"]["seed"] == 1 and b["adaptation"]["seed"] == 2
    assert logits(a) != logits(b)
    unseeded = classify(client, "tps", seed=None).json()["results"][0]
    assert isinstance(unseeded["adaptation"]["seed"], int)


def test_adaptation_report_and_compare(client):
    r = classify(client, "tpt", compare=True, options={"lr": 0.5})
    result = r.json()["results"][0]
    report = result["adaptation"]
    assert report["method"] == "tpt" and report["steps"] == 1 and report["views"] == 64
    assert report["selected_views"] == 6 and report["seconds"] > 0
    assert report["entropy_after"] < report["entropy_before"]
    zs = classify(client, "zero_shot").json()["results"][0]
    assert result["zero_shot"]["label"] == zs["label"] == report["zero_shot_label"]
    assert report["changed"] == (result["label"] != zs["label"])
    # The same numbers up to the last float bit (the zero-shot lane encodes both images in one batch).
    assert [p["label"] for p in result["zero_shot"]["predictions"]] == [p["label"] for p in zs["predictions"]]
    assert all(abs(logits(result["zero_shot"])[k] - logits(zs)[k]) < 1e-5 for k in LABELS)
    assert classify(client, "tpt").json()["results"][0]["zero_shot"] is None


def test_zero_reports_agreement_and_ranks_its_winner_first(client):
    result = classify(client, "zero").json()["results"][0]
    assert 0 < result["adaptation"]["agreement"] <= 1
    assert result["adaptation"]["selected_views"] == 19
    assert result["label"] == result["predictions"][0]["label"]


def test_abstain_below(client):
    result = classify(client, "zero_shot", abstain_below=1.0).json()["results"][0]
    assert result["abstained"] is True and result["label"] is None
    assert result["predictions"]  # still there, to see why
    result = classify(client, "zero_shot", abstain_below=0.0).json()["results"][0]
    assert result["abstained"] is False and result["label"] == result["predictions"][0]["label"]


@pytest.mark.parametrize("method", method_names())
def test_calibration_moves_confidence_never_the_label(client, method):
    images = [b64(png_bytes(seed=s, size=(40 + s, 36))) for s in range(4)]
    results = classify(client, method, images=images, options=STRONG.get(method, {})).json()["results"]
    for result in results:
        preds = result["predictions"]
        assert len(preds) == len(LABELS)
        raw = [p["raw_probability"] for p in preds]
        calibrated = [p["probability"] for p in preds]
        if method != "zero":  # ZERO ranks by its vote; every other method by its logits
            assert [p["logit"] for p in preds] == sorted((p["logit"] for p in preds), reverse=True)
            assert raw == sorted(raw, reverse=True)
        assert calibrated[0] == max(calibrated) and result["label"] == preds[0]["label"]
        assert sum(calibrated) == pytest.approx(1.0, abs=1e-5) and sum(raw) == pytest.approx(1.0, abs=1e-5)
        # Confidence is the answer's probability: its own score, or 1/C when the score is lower.
        assert result["confidence"] == calibrated[0]
        assert result["confidence"] == pytest.approx(max(preds[0]["score"], 1 / len(LABELS)), abs=2e-4)
        assert result["none_of_these"] == pytest.approx(1 - max(p["score"] for p in preds), abs=1e-6)
        # A label's own score reads as a probability and needs no other label: they need not sum to 1.
        assert all(0 <= p["score"] <= 1 for p in preds)


def test_confidence_is_the_label_free_model_of_the_zero_shot_prediction(client):
    result = classify(client, "zero_shot", images=[b64(png_bytes(seed=5))]).json()["results"][0]
    logits = torch.tensor([[p["logit"] for p in result["predictions"]]])
    model = ConfidenceModel.default()
    assert result["confidence"] == pytest.approx(max(float(model.predict(logits)[0]), 1 / len(LABELS)), abs=2e-4)
    scores = model.scores(logits)[0]
    assert [p["score"] for p in result["predictions"]] == pytest.approx(scores.tolist(), abs=1e-5)
    described = client.get("/v1/models").json()["models"][0]["calibration"]
    assert described["kind"] == "label-free" and described["source"] == "default"
    assert described["images"] == model.images


def test_a_model_card_confidence_model_replaces_the_default(settings, tiny_model_dir, tmp_path):
    folder = tmp_path / "calibrated"
    shutil.copytree(tiny_model_dir, folder)
    own = ConfidenceModel(
        intercept=2.0,
        weights=(0.0, 0.0, 0.0),
        means=(0.0, 0.0, 0.0),
        scales=(1.0, 1.0, 1.0),
        images=123,
        data="the model's own images",
    )
    card = json.loads((folder / "ttaserve.json").read_text()) | {"confidence": own.to_dict()}
    (folder / "ttaserve.json").write_text(json.dumps(card))
    settings.model = f"local-dir:{folder}"
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        described = c.get("/v1/models").json()["models"][0]["calibration"]
        assert (described["source"], described["images"]) == ("model card", 123)
        for method in ("zero_shot", "tps"):
            result = classify(c, method).json()["results"][0]
            assert result["confidence"] == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))), abs=1e-5)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"views": 0}, "views"),
        ({"views": 500}, "TTA_MAX_VIEWS"),
        ({"steps": 50}, "TTA_MAX_STEPS"),
        ({"lr": -1}, "lr"),
        ({"selection": "lots"}, "selection"),
    ],
)
def test_out_of_range_options_are_422(client, options, words):
    r = classify(client, "tpt", options=options)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_options", r.text
    assert words in r.json()["error"]["message"]


def test_multipart_takes_seed_compare_and_abstain(client):
    r = client.post(
        "/v1/classify",
        files={"image": ("a.png", png_bytes(seed=3), "image/png")},
        data={"labels": LABELS, "method": "tps", "seed": "5", "compare": "true", "abstain_below": "0.99"},
    )
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["adaptation"]["seed"] == 5 and result["zero_shot"] is not None and result["abstained"] is True


def test_backbone_unchanged_and_no_state_left_after_50_mixed_requests(client):
    model = client.app.state.runtime.engine.backbone.model
    before = state_hash(model)
    jobs = [(m, s) for s in range(9) for m in method_names()][:50]
    with ThreadPoolExecutor(4) as pool:
        statuses = list(
            pool.map(lambda ms: classify(client, ms[0], ms[1], images=[b64(png_bytes(seed=ms[1]))]).status_code, jobs)
        )
    assert statuses == [200] * 50
    assert state_hash(model) == before
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch.distributed objects warns of deprecations
        warnings.simplefilter("ignore")
        live = gc.get_objects()
        leftovers = [o for o in live if isinstance(o, torch.Tensor) and (o.requires_grad or o.grad is not None)]
        optimizers = [o for o in live if isinstance(o, torch.optim.Optimizer)]
    assert leftovers == [] and optimizers == []


def test_adaptation_metrics(client):
    classify(client, "tpt", options={"lr": 0.5})
    classify(client, "zero_shot")
    text = client.get("/metrics").text
    assert 'tta_adapt_duration_seconds_count{method="tpt"} 2.0' in text
    assert 'tta_entropy_reduction_nats_count{method="tpt"} 2.0' in text
    assert 'tta_confidence_count{method="tpt"} 2.0' in text
    assert 'tta_confidence_count{method="zero_shot"} 2.0' in text
    assert 'tta_prediction_entropy_ratio_count{method="tpt"} 2.0' in text
    assert "tta_abstentions_total{" not in text  # nothing was withheld
    classify(client, "zero_shot", abstain_below=1.0)
    text = client.get("/metrics").text
    assert 'tta_abstentions_total{method="zero_shot"} 2.0' in text
    assert "tta_prediction_changed_total" in text
    assert 'tta_stage_duration_seconds_count{stage="adapt"} 1.0' in text


def test_tps_prototypes_use_the_label_sets_descriptions(client):
    descriptions = {"red": ["a warm colour like blood"], "a cat": ["has whiskers", "small furry pet"]}
    assert (
        client.post(
            "/v1/label-sets",
            json={"name": "described", "labels": LABELS, "templates": "simple", "descriptions": descriptions},
        ).status_code
        == 201
    )
    image = png_bytes(seed=1, size=(70, 50))
    body = {"images": [b64(image)], "label_set": "described", "top_k": len(LABELS), "seed": 3}
    tps = client.post("/v1/classify", json=body | {"method": "tps", "options": {"steps": 0}}).json()["results"][0]
    plain = client.post("/v1/classify", json=body | {"method": "zero_shot"}).json()["results"][0]
    backbone = client.app.state.runtime.engine.backbone
    feat = backbone.encode_images(backbone.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None])[0]
    for label in LABELS:
        template = backbone.encode_prompts([f"a photo of a {label}."])[0]
        if label in descriptions:
            described = backbone.encode_prompts([describe(label, d) for d in descriptions[label]]).mean(0)
            proto = torch.nn.functional.normalize((template + described) / 2, dim=-1)
        else:
            proto = template
        expected = backbone.logit_scale * float(feat @ proto)
        assert logits(tps)[label] == pytest.approx(expected, abs=1e-4)
        if label not in descriptions:
            assert logits(tps)[label] == pytest.approx(logits(plain)[label], abs=1e-5)
    assert logits(tps)["a cat"] != pytest.approx(logits(plain)["a cat"], abs=1e-3)
    assert describe("a cat", "has whiskers") == "a cat, which has whiskers"
    assert describe("a cat", "small furry pet") == "a cat, which has small furry pet"
    assert describe("red", "a warm colour") == "red, which is a warm colour"


def test_a_method_the_model_cannot_run_is_refused_and_the_server_carries_on(settings):
    class OtherTokenizer:
        """Not CLIP's BPE tokenizer: zero-shot works, prompt learning cannot splice a context in."""

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, texts):
            return self.inner(texts)

    def load(settings_, spec):
        backbone = load_backbone(settings_, spec)
        backbone.tokenizer = OtherTokenizer(backbone.tokenizer)
        return backbone

    with TestClient(create_app(settings, load=load)) as c:
        wait_ready(c)
        refused = classify(c, "tpt")
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "method_unsupported"
        assert "tokenizer" in refused.json()["error"]["message"]
        assert classify(c, "tps").status_code == 200
        assert classify(c, "zero_shot").status_code == 200
        assert 'tta_requests_total{method="tpt",outcome="client_error"} 1.0' in c.get("/metrics").text
