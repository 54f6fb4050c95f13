"""The adaptation lane through HTTP: requests adapted together, admission under overload, the confidence
gate, per-request deadlines, and the lane's metrics."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from tests.support.apps import metric, wait_ready, wait_until
from tests.support.gates import LaneHold, gated_loader
from tests.support.images import b64, png_bytes
from tests.support.requests import BATCHED, LABEL_SETS, body, logits, probabilities


@pytest.mark.parametrize("method", BATCHED)
def test_a_request_gets_the_same_answer_alone_and_in_a_batch_of_8_mixed_requests(settings, method):
    settings.adapt_max_batch = 8
    requests = [body(method, seed, LABEL_SETS[seed % 3]) for seed in range(8)]
    lane = LaneHold()
    with TestClient(create_app(settings, load=lane.loader)) as c:
        wait_ready(c)
        alone = [c.post("/v1/classify", json=r).json()["results"][0] for r in requests]
        assert all(a["adaptation"]["batch_images"] == 1 for a in alone)
        batched = lane.stack(c, method, requests)
        sizes = [b["adaptation"]["batch_images"] for b in batched]
        assert sizes == [8] * 8, f"the requests were not adapted together: batch sizes {sizes}"
        for a, b in zip(alone, batched, strict=True):
            assert a["label"] == b["label"]
            assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
            la, lb = logits(a), logits(b)
            assert max(abs(la[k] - lb[k]) for k in la) < 1e-4
        text = c.get("/metrics").text
        assert metric(text, "tta_adapt_batch_size_count") == 8 + 1 + 1  # 8 alone, the plug, the 8 together


def held_views_loader(gate: threading.Event, entered: threading.Event, hold_all: bool = False):
    """Hold encoder calls of several images (view batches) until ``gate`` opens; with ``hold_all``, single
    images too (the zero-shot lane)."""
    return gated_loader(gate, entered, hold=lambda images: hold_all or images.shape[0] > 1)


def test_over_budget_adaptation_is_served_zero_shot_and_counted(settings):
    settings.adapt_budget_s = 1e-6  # any admitted work fills the lane
    gate, entered = threading.Event(), threading.Event()
    labels = LABEL_SETS[0]
    with TestClient(create_app(settings, load=held_views_loader(gate, entered))) as c:
        wait_ready(c)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/v1/classify", json=body("tpt", 1, labels))
            assert entered.wait(10)  # the lane is busy with the first request's views
            second = c.post("/v1/classify", json=body("tpt", 2, labels, compare=True))
            assert second.status_code == 200, second.text
            result = second.json()["results"][0]
            assert result["adaptation"]["skipped"] == "overload"
            assert result["adaptation"]["steps"] == 0 and result["adaptation"]["views"] == 1
            assert result["label"] == result["zero_shot"]["label"]
            assert result["confidence"] == pytest.approx(result["zero_shot"]["confidence"])
            gate.set()
            assert first.result().status_code == 200
            assert first.result().json()["results"][0]["adaptation"]["skipped"] is None
        text = c.get("/metrics").text
        assert metric(text, 'tta_adapt_skipped_total{reason="overload"}') == 1
        assert metric(text, 'tta_adapt_skipped_total{reason="confident"}') == 0
        assert metric(text, 'tta_requests_total{method="tpt",outcome="success"}') == 2


def test_429_only_when_the_zero_shot_lane_is_full_too(settings):
    settings.adapt_budget_s = 1e-6
    settings.max_queue_size = 1
    gate, entered = threading.Event(), threading.Event()
    holding: list[int] = []  # encoder calls held at the gate: one per lane once both lanes are busy

    def hold(images) -> bool:
        holding.append(images.shape[0])
        return True

    labels = LABEL_SETS[0]
    with TestClient(create_app(settings, load=gated_loader(gate, entered, hold=hold))) as c:
        wait_ready(c)

        with ThreadPoolExecutor(3) as pool:
            adapting = pool.submit(c.post, "/v1/classify", json=body("zero", 1, labels))
            wait_until(lambda: len(holding) == 1, "the adaptation lane to hold its job")
            held = pool.submit(c.post, "/v1/classify", json={"images": [b64(png_bytes())], "labels": labels})
            wait_until(lambda: len(holding) == 2, "the zero-shot lane to hold its job")
            waiting = pool.submit(c.post, "/v1/classify", json={"images": [b64(png_bytes())], "labels": labels})
            # One job waits behind them: the zero-shot queue (of 1) is full.
            wait_until(lambda: metric(c.get("/metrics").text, "tta_queue_depth") == 1, "a job to queue")
            refused = c.post("/v1/classify", json=body("tpt", 2, labels))
            assert refused.status_code == 429, refused.text
            assert refused.headers["Retry-After"] == str(settings.retry_after_s)
            gate.set()
            assert [f.result().status_code for f in (adapting, held, waiting)] == [200, 200, 200]


def test_confidence_gate_skips_confident_images(settings):
    labels = LABEL_SETS[0]
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        gated = c.post("/v1/classify", json=body("tps", 3, labels, confidence_gate=0.0, compare=True)).json()
        result = gated["results"][0]
        assert result["adaptation"]["skipped"] == "confident"
        assert result["adaptation"]["steps"] == 0
        assert result["label"] == result["zero_shot"]["label"]
        open_gate = c.post("/v1/classify", json=body("tps", 3, labels, confidence_gate=1.0)).json()
        assert open_gate["results"][0]["adaptation"]["skipped"] is None
        assert open_gate["results"][0]["adaptation"]["steps"] == 1
        bad = c.post("/v1/classify", json=body("tps", 3, labels, confidence_gate=1.5))
        assert bad.status_code == 422 and "confidence_gate" in bad.json()["error"]["message"]
        text = c.get("/metrics").text
        assert metric(text, 'tta_adapt_skipped_total{reason="confident"}') == 1


def test_server_wide_confidence_gate(settings):
    settings.confidence_gate = 0.0
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        result = c.post("/v1/classify", json=body("tpt", 4, LABEL_SETS[1])).json()["results"][0]
        assert result["adaptation"]["skipped"] == "confident"


def test_request_timeout_header(settings):
    gate, entered = threading.Event(), threading.Event()
    labels = LABEL_SETS[0]
    with TestClient(create_app(settings, load=held_views_loader(gate, entered))) as c:
        wait_ready(c)
        for bad in ("soon", "0", "-1", "inf", "nan"):
            r = c.post("/v1/classify", json=body("zero", 1, labels), headers={"X-Request-Timeout": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_timeout", bad
        # The views' encode is held until after the answer: only the header's deadline can have ended it.
        r = c.post("/v1/classify", json=body("zero", 1, labels), headers={"X-Request-Timeout": "0.3"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        gate.set()
        ok = c.post("/v1/classify", json=body("zero", 1, labels), headers={"X-Request-Timeout": "60"})
        assert ok.status_code == 200
        text = c.get("/metrics").text
        assert metric(text, 'tta_requests_total{method="zero",outcome="timeout"}') == 1


def test_lane_metrics_are_exposed(client):
    client.post("/v1/classify", json=body("tps", 1, LABEL_SETS[0]))
    text = client.get("/metrics").text
    for name in (
        "tta_adapt_batch_size_count",
        "tta_adapt_pending_seconds",
        "tta_gpu_memory_allocated_bytes",
        "tta_gpu_memory_peak_bytes",
    ):
        metric(text, name)
    assert metric(text, "tta_adapt_batch_size_count") == 1
    assert metric(text, "tta_gpu_memory_allocated_bytes") == 0  # the CPU


def test_stacked_batches_stay_within_the_memory_budget(settings):
    labels = LABEL_SETS[0]
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        need = c.post("/v1/classify", json=body("tpt", 0, labels)).json()["results"][0]["adaptation"]["memory_bytes"]
        assert need > 0
    settings.adapt_memory_bytes = int(2.5 * need)  # two images of this label set, not three
    settings.adapt_max_batch = 8
    requests = [body("tpt", seed, labels) for seed in range(4)]
    lane = LaneHold()
    with TestClient(create_app(settings, load=lane.loader)) as c:
        wait_ready(c)
        results = lane.stack(c, "tpt", requests)  # one lane batch of 4 images, stacked 2 and 2
        assert metric(c.get("/metrics").text, "tta_adapt_memory_budget_bytes") == int(2.5 * need)
    assert [r["adaptation"]["batch_images"] for r in results] == [2, 2, 2, 2]
    assert all(r["adaptation"]["memory_bytes"] == need and r["adaptation"]["skipped"] is None for r in results)


@pytest.mark.parametrize("method", ["tpt", "ttl"])
def test_an_image_too_big_for_the_memory_budget_is_served_zero_shot(settings, method):
    labels = LABEL_SETS[1]
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        need = c.post("/v1/classify", json=body(method, 1, labels)).json()["results"][0]["adaptation"]["memory_bytes"]
    settings.adapt_memory_bytes = need - 1
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        r = c.post("/v1/classify", json=body(method, 1, labels, compare=True))
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert result["adaptation"]["skipped"] == "memory"
        assert result["adaptation"]["memory_bytes"] == need and result["adaptation"]["steps"] == 0
        assert result["label"] == result["zero_shot"]["label"]
        fewer_views = c.post("/v1/classify", json=body(method, 1, labels, options={"views": 8})).json()
        assert fewer_views["results"][0]["adaptation"]["skipped"] is None  # a smaller request still adapts
        text = c.get("/metrics").text
        assert metric(text, 'tta_adapt_skipped_total{reason="memory"}') == 1


def test_every_method_runs_with_bf16_forwards(settings):
    """The GPU's mixed precision on the CPU: frozen towers in bf16, trained tensors and optimizer state
    in fp32, alone and stacked; the answers stay close to fp32's."""
    requests = {m: [body(m, seed, LABEL_SETS[seed % 3], options={}) for seed in range(3)] for m in BATCHED}
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        fp32 = {m: [c.post("/v1/classify", json=r).json()["results"][0] for r in rs] for m, rs in requests.items()}
    settings.precision = "bf16"
    lane = LaneHold()
    with TestClient(create_app(settings, load=lane.loader)) as c:
        wait_ready(c)
        assert c.get("/v1/models").json()["models"][0]["precision"] == "bf16"
        for method, rs in requests.items():
            bf16 = lane.stack(c, method, rs)
            assert [b["adaptation"]["batch_images"] for b in bf16] == [3, 3, 3], method
            for a, b in zip(fp32[method], bf16, strict=True):
                assert b["adaptation"]["skipped"] is None
                pa, pb = probabilities(a), probabilities(b)
                assert max(abs(pa[k] - pb[k]) for k in pa) < 0.05, (method, pa, pb)
