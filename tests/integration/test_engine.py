"""The engine under concurrent load: micro-batching, backpressure (429), deadlines (504), a frozen backbone."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.backbone import Backbone
from tests.conftest import wait_ready
from tests.helpers import b64, png_bytes

LABELS = ["red", "green", "blue"]


def state_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def gated_loader(gate: threading.Event, entered: threading.Event | None = None,
                 hold: Callable[[torch.Tensor], bool] = lambda images: True):
    """A loader whose backbone holds the encoder calls ``hold`` picks (all, by default) until ``gate`` opens."""

    def load(settings, spec):
        backbone = Backbone.load(settings, spec)
        encode = backbone.encode_images
        backbone.warm_up()  # warm up before the gate is installed

        def held(images):
            if hold(images):
                if entered is not None:
                    entered.set()
                gate.wait(30)
            return encode(images)

        backbone.encode_images = held
        backbone.warm_up = lambda: None
        return backbone

    return load


def test_concurrent_requests_are_micro_batched_and_the_backbone_never_changes(settings):
    settings.max_batch_delay_ms = 50
    settings.max_batch_size = 16
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        model = c.app.state.engine.backbone.model
        before = state_hash(model)
        requests = [{"images": [b64(png_bytes(seed=i))], "labels": LABELS[: 2 + i % 2]} for i in range(48)]
        alone = {i: c.post("/v1/classify", json=requests[i]).json()["results"][0] for i in range(4)}
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda body: c.post("/v1/classify", json=body), requests))
        assert [r.status_code for r in responses] == [200] * len(requests)
        for i, expected in alone.items():
            got = responses[i].json()["results"][0]
            assert got["label"] == expected["label"]
            assert got["confidence"] == pytest.approx(expected["confidence"], abs=1e-5)
        text = c.get("/metrics").text
        batches = metric(text, "tta_batch_size_count")
        images = metric(text, "tta_batch_size_sum")
        assert images == 52
        assert images / batches > 1.5, f"no micro-batching: {images} images in {batches} batches"
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
            deadline = time.monotonic() + 10
            while c.app.state.engine.queue_depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
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
        started = time.monotonic()
        r = c.post("/v1/classify", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.monotonic() - started < 5
        gate.set()
        assert c.post("/v1/classify", json=body).status_code == 200
        assert 'tta_requests_total{method="zero_shot",outcome="timeout"} 1.0' in c.get("/metrics").text


def test_a_failing_batch_fails_its_requests_not_the_worker(settings):
    fail_next = threading.Event()

    def flaky(settings_, spec):
        backbone = Backbone.load(settings_, spec)
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
