"""Faults inside adaptation fail or degrade the request they hit, never the server.

The backbone's loader is wrapped so the test decides which encoder calls fail: out-of-memory errors
injected on the CPU (``torch.OutOfMemoryError``, what CUDA raises) and a plain exception in a step.
"""

from __future__ import annotations

import logging
import threading

import torch
from fastapi.testclient import TestClient

from server.api import create_app
from server.clip import load_backbone
from server.engine.engine import LOADER_THREAD
from tests.support.apps import metric, wait_ready
from tests.support.images import b64, png_bytes

LABELS = ["red", "green", "blue"]
VIEWS = 4


def body(n_images: int = 2, steps: int = 1) -> dict:
    return {
        "images": [b64(png_bytes(seed=i, size=(48, 40))) for i in range(n_images)],
        "labels": LABELS,
        "method": "tpt",
        "options": {"views": VIEWS, "steps": steps},
    }


class OutOfMemory:
    """A loader whose ``encode_images`` raises out-of-memory for batches of more than ``limit`` images while on."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.calls: list[int] = []  # images per encoder call of the lanes
        self._lock = threading.Lock()

    def load(self, settings, spec):
        backbone = load_backbone(settings, spec)
        encode = backbone.encode_images

        def encode_images(images: torch.Tensor) -> torch.Tensor:
            if threading.current_thread().name != LOADER_THREAD:
                with self._lock:
                    self.calls.append(int(images.shape[0]))
                if self.limit is not None and images.shape[0] > self.limit:
                    raise torch.OutOfMemoryError(f"simulated: cannot hold {images.shape[0]} images")
            return encode(images)

        backbone.encode_images = encode_images
        return backbone


def test_a_stacked_batch_out_of_memory_is_retried_image_by_image(settings):
    oom = OutOfMemory()
    with TestClient(create_app(settings, load=oom.load)) as c:
        wait_ready(c)
        oom.limit = VIEWS  # one image's views fit; two images' do not
        r = c.post("/v1/classify", json=body())
    assert r.status_code == 200, r.text
    assert oom.calls == [2 * VIEWS, VIEWS, VIEWS]  # together, then each alone
    for result in r.json()["results"]:
        assert result["adaptation"]["skipped"] is None
        assert result["adaptation"]["steps"] == 1 and result["adaptation"]["batch_images"] == 1


def test_an_image_out_of_memory_alone_is_answered_zero_shot_and_flagged(settings):
    oom = OutOfMemory()
    with TestClient(create_app(settings, load=oom.load)) as c:
        wait_ready(c)
        expected = c.post("/v1/classify", json={**body(), "method": "zero_shot", "options": {}}).json()["results"]
        oom.limit = 1  # no adaptation fits, not even one image's
        oom.calls.clear()
        r = c.post("/v1/classify", json=body())
        assert r.status_code == 200, r.text
        assert oom.calls == [2 * VIEWS, VIEWS, 1, VIEWS, 1]  # together, then image 1 alone and zero-shot, image 2
        results = r.json()["results"]
        assert [res["adaptation"]["skipped"] for res in results] == ["memory", "memory"]
        assert [res["adaptation"]["steps"] for res in results] == [0, 0]
        assert [res["label"] for res in results] == [e["label"] for e in expected]
        assert metric(c.get("/metrics").text, 'tta_adapt_skipped_total{reason="memory"}') == 2
        oom.limit = None  # the memory is back: the next request adapts
        after = c.post("/v1/classify", json=body())
    assert after.status_code == 200
    assert [res["adaptation"]["skipped"] for res in after.json()["results"]] == [None, None]


def test_an_exception_in_an_adaptation_step_fails_that_request_alone(settings, caplog):
    fail = threading.Event()

    def load(settings_, spec):
        backbone = load_backbone(settings_, spec)
        encode = backbone.encode_text_with_contexts

        def encode_text_with_contexts(ctx, inputs):
            if fail.is_set():
                raise ValueError("a bug in a step (simulated)")
            return encode(ctx, inputs)

        backbone.encode_text_with_contexts = encode_text_with_contexts
        return backbone

    caplog.set_level(logging.INFO)
    with TestClient(create_app(settings, load=load), raise_server_exceptions=False) as c:
        wait_ready(c)
        fail.set()
        r = c.post("/v1/classify", json=body(1, steps=3), headers={"X-Request-ID": "step-fault"})
        fail.clear()
        assert r.status_code == 500, r.text
        assert r.json()["error"] == {
            "code": "internal_error",
            "message": "internal server error; see the server log",
            "request_id": "step-fault",
        }
        after = c.post("/v1/classify", json=body(1, steps=3))
        assert after.status_code == 200, after.text
        assert after.json()["results"][0]["adaptation"]["steps"] == 3
        assert 'tta_requests_total{method="tpt",outcome="error"} 1.0' in c.get("/metrics").text
    # Logged once with the request id and the traceback that leads to the step.
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info and r.request_id == "step-fault"]
    assert logged, [(r.name, r.request_id, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR]
    assert "a bug in a step (simulated)" in caplog.text and "encode_text_with_contexts" in caplog.text
