"""The GPU paths through HTTP: every method on CUDA against the CPU, bf16 forwards with fp32 trained
tensors, stacked batches on the device, the GPU memory gauges and the lane's learnt memory estimate.

Skipped without CUDA (``python -m pytest -m gpu`` on a GPU machine runs them). With
``TTA_TEST_GPU_DEVICE=cpu`` they run on the CPU instead, which checks the tests themselves where no GPU
is lent; the assertions about GPU memory are then left out.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from server.api import create_app
from tests.support.apps import metric, state_hash, wait_ready
from tests.support.gates import LaneHold
from tests.support.requests import BATCHED, LABEL_SETS, body, logits, probabilities

DEVICE = os.environ.get("TTA_TEST_GPU_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs CUDA"),
]


def answers(
    settings, requests: dict[str, list[dict[str, Any]]], stacked: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """Each method's requests through a fresh app on ``settings``: one at a time, or queued behind a held
    plug so that the lane stacks them together."""
    lane = LaneHold()
    with TestClient(create_app(settings, load=lane.loader)) as c:
        wait_ready(c)
        out = {}
        for method, rs in requests.items():
            out[method] = (
                lane.stack(c, method, rs)
                if stacked
                else [c.post("/v1/classify", json=r).json()["results"][0] for r in rs]
            )
        return out


def max_difference(a: dict, b: dict) -> float:
    pa, pb = probabilities(a), probabilities(b)
    return max(abs(pa[k] - pb[k]) for k in pa)


def test_every_method_on_the_device_matches_the_cpu_in_fp32_and_stays_close_in_bf16(settings):
    requests = {m: [body(m, seed, LABEL_SETS[seed % 3], options={}) for seed in range(3)] for m in BATCHED}
    cpu = answers(settings, requests)
    settings.device = DEVICE
    fp32 = answers(settings, requests)
    settings.precision = "bf16"
    bf16 = answers(settings, requests, stacked=True)
    for method in BATCHED:
        for ref, a, b in zip(cpu[method], fp32[method], bf16[method], strict=True):
            assert a["label"] == ref["label"] and max_difference(a, ref) < 1e-3, method
            assert b["adaptation"]["skipped"] is None and max_difference(b, ref) < 0.05, method
        assert [b["adaptation"]["batch_images"] for b in bf16[method]] == [3, 3, 3], method


def test_a_stacked_batch_on_the_device_answers_as_each_request_alone(settings):
    settings.device = DEVICE
    requests = {m: [body(m, seed, LABEL_SETS[seed % 3]) for seed in range(4)] for m in ("tpt", "ttl", "tps")}
    alone = answers(settings, requests)
    together = answers(settings, requests, stacked=True)
    for method, results in together.items():
        assert [r["adaptation"]["batch_images"] for r in results] == [4, 4, 4, 4], method
        for a, b in zip(alone[method], results, strict=True):
            la, lb = logits(a), logits(b)
            assert a["label"] == b["label"] and max(abs(la[k] - lb[k]) for k in la) < 1e-3, method


def test_gpu_memory_is_reported_and_the_lane_learns_its_estimate(settings):
    settings.device = DEVICE
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        engine = c.app.state.runtime.engine
        assert c.get("/v1/models").json()["models"][0]["device"].startswith(DEVICE)
        before = state_hash(engine.backbone.model)
        results = [
            c.post("/v1/classify", json=body("tpt", seed, LABEL_SETS[0])).json()["results"][0] for seed in range(3)
        ]
        assert all(r["adaptation"]["memory_bytes"] > 0 and r["adaptation"]["skipped"] is None for r in results)
        assert state_hash(engine.backbone.model) == before
        text = c.get("/metrics").text
        allocated = metric(text, "tta_gpu_memory_allocated_bytes")
        peak = metric(text, "tta_gpu_memory_peak_bytes")
        if DEVICE.startswith("cuda"):
            assert 0 < allocated <= peak
            assert engine.runner.gpu_peak_bytes > 0  # the lane's peak measurements ran and kept the start-up peak
            assert "tpt" in engine.runner.memory._correction  # corrected by what the batches reached
        else:
            assert allocated == peak == 0
