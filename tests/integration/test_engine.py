"""The engine under concurrent load: micro-batching, backpressure (429), deadlines (504), a frozen backbone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.clip import load_backbone
from tests.support.apps import metric, state_hash, wait_ready, wait_until
from tests.support.gates import gated_loader
from tests.support.images import b64, png_bytes

LABELS = ["red", "green", "blue"]


def test_concurrent_requests_are_micro_batched_and_the_backbone_never_changes(settings):
    settings.max_batch_size = 16
    gate, entered, armed = threading.Event(), threading.Event(), threading.Event()
    # Once armed, the next encode (the plug's) is held: the 48 requests queue up behind it.
    hold_next = gated_loader(gate, entered, hold=lambda images: armed.is_set() and not entered.is_set())
    with TestClient(create_app(settings, load=hold_next)) as c:
        wait_ready(c)
        model = c.app.state.runtime.engine.backbone.model
        before = state_hash(model)
        requests = [{"images": [b64(png_bytes(seed=i))], "labels": LABELS[: 2 + i % 2]} for i in range(48)]
        alone = {i: c.post("/v1/classify", json=requests[i]).json()["results"][0] for i in range(4)}
        armed.set()
        with ThreadPoolExecutor(49) as pool:
            plug = pool.submit(c.post, "/v1/classify", json=requests[0])
            assert entered.wait(60)
            futures = [pool.submit(c.post, "/v1/classify", json=body) for body in requests]
            wait_until(lambda: metric(c.get("/metrics").text, "tta_queue_depth") == 48, "48 jobs to queue")
            gate.set()
            responses = [f.result() for f in futures]
            assert plug.result().status_code == 200
        assert [r.status_code for r in responses] == [200] * len(requests)
        for i, expected in alone.items():
            got = responses[i].json()["results"][0]
            assert got["label"] == expected["label"]
            assert got["confidence"] == pytest.approx(expected["confidence"], abs=1e-5)
        text = c.get("/metrics").text
        # 4 alone, the plug, then the 48 queued requests in three batches of max_batch_size.
        assert metric(text, "tta_batch_size_sum") == 4 + 1 + 48
        assert metric(text, "tta_batch_size_count") == 4 + 1 + 3
        assert state_hash(model) == before
        assert all(not p.requires_grad for p in model.parameters())


def test_full_queue_answers_429_with_retry_after(settings):
    settings.max_queue_size = 1
    settings.retry_after_s = 3
    gate, entered = threading.Event(), threading.Event()
    body = {"images": [b64(png_bytes())], "labels": LABELS}
    with TestClient(create_app(settings, load=gated_loader(gate, entered))) as c:
        wait_ready(c)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(c.post, "/v1/classify", json=body)
            assert entered.wait(10)  # the worker holds the first job
            second = pool.submit(c.post, "/v1/classify", json=body)
            wait_until(lambda: metric(c.get("/metrics").text, "tta_queue_depth") == 1, "the second job to queue")
            third = c.post("/v1/classify", json=body)
            assert third.status_code == 429
            assert third.headers["retry-after"] == "3"
            assert third.json()["error"]["code"] == "queue_full"
            gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        text = c.get("/metrics").text
        assert 'tta_rejected_total{reason="queue_full"} 1.0' in text
        assert 'tta_requests_total{method="zero_shot",outcome="rejected"} 1.0' in text


def test_deadline_answers_504_and_the_server_recovers(settings):
    settings.request_timeout_s = 0.3
    gate = threading.Event()
    body = {"images": [b64(png_bytes())], "labels": LABELS}
    with TestClient(create_app(settings, load=gated_loader(gate))) as c:
        wait_ready(c)
        # The gate holds the encoder until after the answer: only the deadline can have ended the request.
        r = c.post("/v1/classify", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        gate.set()
        assert c.post("/v1/classify", json=body).status_code == 200
        assert 'tta_requests_total{method="zero_shot",outcome="timeout"} 1.0' in c.get("/metrics").text


def test_a_failing_batch_fails_its_requests_not_the_worker(settings):
    fail_next = threading.Event()

    def flaky(settings_, spec):
        backbone = load_backbone(settings_, spec)
        encode = backbone.encode_images

        def sometimes(images):
            if fail_next.is_set():
                fail_next.clear()
                raise RuntimeError("CUDA error: out of memory (simulated)")
            return encode(images)

        backbone.encode_images = sometimes
        return backbone

    with TestClient(create_app(settings, load=flaky), raise_server_exceptions=False) as c:
        wait_ready(c)
        body = {"images": [b64(png_bytes())], "labels": LABELS}
        fail_next.set()
        r = c.post("/v1/classify", json=body)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert c.post("/v1/classify", json=body).status_code == 200
