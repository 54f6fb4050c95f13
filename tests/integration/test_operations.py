"""Health, readiness, metrics, discovery, request ids and the OpenAPI document."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from server.api import create_app
from server.clip import load_backbone
from tests.support.apps import PATIENCE_S, wait_ready
from tests.support.images import b64, png_bytes


def test_readyz_is_503_until_loaded_and_warmed(settings):
    release = threading.Event()
    warmed = []

    def slow_load(s, spec):
        release.wait(30)
        backbone = load_backbone(s, spec)
        original = backbone.warm_up
        backbone.warm_up = lambda: (original(), warmed.append(True))
        return backbone

    with TestClient(create_app(settings, load=slow_load)) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        r = c.post("/v1/classify", json={"images": [b64(png_bytes())], "labels": ["a"]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert c.get("/v1/models").json()["models"][0]["ready"] is False
        release.set()
        wait_ready(c)
        assert warmed == [True]
        assert c.get("/readyz").json() == {"status": "ready"}


def test_readyz_reports_a_failed_load(settings):
    def broken(s, spec):
        raise RuntimeError("weights are corrupt")

    failed = threading.Event()
    app = create_app(settings, load=broken)
    app.state.on_fatal = lambda exc: failed.set()  # what `python -m server` sets to exit on a failed load
    with TestClient(app) as c:
        assert failed.wait(PATIENCE_S)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "load_failed"
        assert "weights are corrupt" in r.json()["error"]["message"]


def test_request_id_is_echoed_or_generated(client):
    r = client.get("/healthz", headers={"X-Request-ID": "my-trace-42"})
    assert r.headers["x-request-id"] == "my-trace-42"
    r = client.post(
        "/v1/classify", json={"images": [b64(png_bytes())], "labels": ["a", "b"]}, headers={"X-Request-ID": "abc-1"}
    )
    assert r.json()["request_id"] == "abc-1"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    # An id with spaces or control characters is not echoed into headers and logs: a new one is made.
    assert client.get("/healthz", headers={"X-Request-ID": "bad id"}).headers["x-request-id"] != "bad id"


def test_errors_are_logged_with_the_request_id(client, caplog):
    caplog.set_level("INFO", logger="ttaserve")
    client.post("/v1/classify", json={"images": [b64(b"junk")], "labels": ["a"]}, headers={"X-Request-ID": "rid-77"})
    records = [r for r in caplog.records if r.name == "ttaserve.errors"]
    assert records and records[-1].request_id == "rid-77"
    assert "invalid_image" in records[-1].getMessage()


def test_models_and_methods(client, settings):
    model = client.get("/v1/models").json()["models"][0]
    assert model["id"] == settings.model and model["ready"] is True
    assert model["device"] == "cpu" and model["precision"] == "fp32"
    assert model["image_size"] == [32, 32] and model["embed_dim"] == 32 and model["context_length"] == 16
    assert model["label_sets"] == ["tiny-colours"]
    methods = client.get("/v1/methods").json()
    assert methods["default"] == "zero_shot"
    zero = next(m for m in methods["methods"] if m["name"] == "zero_shot")
    assert zero["options_schema"]["type"] == "object"
    assert zero["limits"]["max_images_per_request"] == settings.max_images_per_request
    assert set(methods["template_sets"]) == {"simple", "openai_imagenet", "ensemble7"}


def test_metrics_follow_prometheus_conventions(client, settings):
    images = [b64(png_bytes(seed=i)) for i in range(3)]
    assert client.post("/v1/classify", json={"images": images, "labels": ["a", "b"]}).status_code == 200
    client.post("/v1/classify", json={"images": images, "labels": []})
    text = client.get("/metrics").text
    assert 'tta_requests_total{method="zero_shot",outcome="success"} 1.0' in text
    assert 'tta_requests_total{method="zero_shot",outcome="client_error"} 1.0' in text
    assert 'tta_images_total{method="zero_shot"} 3.0' in text
    assert 'tta_request_duration_seconds_count{method="zero_shot"} 2.0' in text
    for stage in ("queue", "decode", "encode", "classify"):
        assert f'tta_stage_duration_seconds_count{{stage="{stage}"}} 1.0' in text
    assert "tta_batch_size_count 1.0" in text and "tta_batch_size_sum 3.0" in text
    assert "tta_queue_depth 0.0" in text
    assert "tta_inflight_requests 0.0" in text
    assert (f'tta_model_info{{device="cpu",model="{settings.model}",precision="fp32",pretrained=""}} 1.0') in text
    assert "_created" not in text


def test_openapi_documents_both_input_forms(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert body["application/json"]["examples"]
    assert "ClassifyRequest" in spec["components"]["schemas"]
    assert "ClassifyResponse" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200
