"""The adaptation lane through HTTP: requests adapted together, admission under overload, the confidence
gate, per-request deadlines, and the lane's metrics."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.conftest import wait_ready
from tests.helpers import b64, png_bytes
from tests.integration.test_engine import gated_loader, metric

LABEL_SETS = [["red", "green", "blue", "a cat", "a dog"], ["a square", "a circle", "a star"],
              ["apple", "banana", "cherry", "grape"]]
BATCHED = ["tpt", "ctpt", "tps", "ttl", "zero", "mta"]


# A large learning rate makes the adaptation visible on the tiny model. Not for TTL: Adam's first step is
# about lr * sign(gradient) per weight, so with thousands of LoRA weights whose gradients are ~0, rounding
# differences of a larger matmul flip signs and lr 0.5 turns them into 1e-4 logit differences.
STRONG = {"tpt": {"lr": 0.5}, "ctpt": {"lr": 0.5}, "tps": {"lr": 0.5}}


def body(method: str, seed: int, labels: list[str], **extra) -> dict:
    return {"images": [b64(png_bytes(seed=seed, size=(60 + seed, 48)))], "labels": labels, "method": method,
            "seed": seed, "top_k": len(labels), "options": STRONG.get(method, {}), **extra}


def logits(result: dict) -> dict[str, float]:
    return {p["label"]: p["logit"] for p in result["predictions"]}


@pytest.mark.parametrize("method", BATCHED)
def test_a_request_gets_the_same_answer_alone_and_in_a_batch_of_8_mixed_requests(settings, method):
    settings.adapt_max_batch = 8
    settings.max_batch_delay_ms = 2000  # the lane waits for company, so the 8 requests share one batch
    requests = [body(method, seed, LABEL_SETS[seed % 3]) for seed in range(8)]
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        alone = [c.post("/v1/classify", json=r).json()["results"][0] for r in requests]
        assert all(a["adaptation"]["batch_images"] == 1 for a in alone)
        with ThreadPoolExecutor(8) as pool:
            batched = [r.json()["results"][0] for r in pool.map(lambda r: c.post("/v1/classify", json=r), requests)]
        sizes = [b["adaptation"]["batch_images"] for b in batched]
        assert max(sizes) >= 4, f"the requests were not adapted together: batch sizes {sizes}"
        for a, b in zip(alone, batched, strict=True):
            assert a["label"] == b["label"]
            assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
            la, lb = logits(a), logits(b)
            assert max(abs(la[k] - lb[k]) for k in la) < 1e-4
        text = c.get("/metrics").text
        assert metric(text, "tta_adapt_batch_size_count") < 16  # 8 alone + fewer than 8 batches


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
        engine = c.app.state.engine

        def wait_for(condition) -> None:
            deadline = time.monotonic() + 10
            while not condition() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert condition()

        with ThreadPoolExecutor(3) as pool:
            adapting = pool.submit(c.post, "/v1/classify", json=body("zero", 1, labels))
            wait_for(lambda: len(holding) == 1)  # the adaptation lane holds its job
            held = pool.submit(c.post, "/v1/classify", json={"images": [b64(png_bytes())], "labels": labels})
            wait_for(lambda: len(holding) == 2)  # the zero-shot lane holds its job
            waiting = pool.submit(c.post, "/v1/classify", json={"images": [b64(png_bytes())], "labels": labels})
            wait_for(lambda: len(engine._queue) == 1)  # and one job waits: the zero-shot queue is full
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
        started = time.monotonic()
        r = c.post("/v1/classify", json=body("zero", 1, labels), headers={"X-Request-Timeout": "0.3"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.monotonic() - started < 5
        gate.set()
        ok = c.post("/v1/classify", json=body("zero", 1, labels), headers={"X-Request-Timeout": "60"})
        assert ok.status_code == 200
        text = c.get("/metrics").text
        assert metric(text, 'tta_requests_total{method="zero",outcome="timeout"}') == 1


def test_lane_metrics_are_exposed(client):
    client.post("/v1/classify", json=body("tps", 1, LABEL_SETS[0]))
    text = client.get("/metrics").text
    for name in ("tta_adapt_batch_size_count", "tta_adapt_pending_seconds", "tta_gpu_memory_allocated_bytes",
                 "tta_gpu_memory_peak_bytes"):
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
    settings.max_batch_delay_ms = 2000
    requests = [body("tpt", seed, labels) for seed in range(4)]
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        with ThreadPoolExecutor(4) as pool:
            results = [r.json()["results"][0] for r in pool.map(lambda r: c.post("/v1/classify", json=r), requests)]
        assert metric(c.get("/metrics").text, "tta_adapt_memory_budget_bytes") == int(2.5 * need)
    assert max(r["adaptation"]["batch_images"] for r in results) == 2
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
    settings.max_batch_delay_ms = 1000
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert c.get("/v1/models").json()["models"][0]["precision"] == "bf16"
        for method, rs in requests.items():
            with ThreadPoolExecutor(3) as pool:
                bf16 = [r.json()["results"][0] for r in pool.map(lambda r: c.post("/v1/classify", json=r), rs)]
            assert max(b["adaptation"]["batch_images"] for b in bf16) > 1, method
            for a, b in zip(fp32[method], bf16, strict=True):
                assert b["adaptation"]["skipped"] is None
                pa = {p["label"]: p["probability"] for p in a["predictions"]}
                pb = {p["label"]: p["probability"] for p in b["predictions"]}
                assert max(abs(pa[k] - pb[k]) for k in pa) < 0.05, (method, pa, pb)
