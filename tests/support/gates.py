"""Loaders whose backbone holds chosen encoder calls until the test opens a gate.

With them a test knows for certain that work is under way (the call was entered) and decides when it
may go on, instead of guessing how long the work takes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi.testclient import TestClient

from server.clip import Backbone, load_backbone
from server.engine.engine import LOADER_THREAD
from tests.support.apps import PATIENCE_S, metric, wait_until
from tests.support.requests import plug


def gated_loader(
    gate: threading.Event,
    entered: threading.Event | None = None,
    hold: Callable[[torch.Tensor], bool] = lambda images: True,
) -> Callable[[Any, Any], Backbone]:
    """A loader whose backbone holds the ``encode_images`` calls of the engine's lanes that ``hold`` picks (all,
    by default) until ``gate`` opens, setting ``entered`` when one is held. The start-up warm-up and
    measurements (on the engine's loader thread) are never held."""

    def load(settings: Any, spec: Any) -> Backbone:
        backbone = load_backbone(settings, spec)
        encode = backbone.encode_images

        def held(images: torch.Tensor) -> torch.Tensor:
            if threading.current_thread().name != LOADER_THREAD and hold(images):
                if entered is not None:
                    entered.set()
                gate.wait(PATIENCE_S)
            return encode(images)

        backbone.encode_images = held  # type: ignore[method-assign]
        return backbone

    return load


class LaneHold:
    """Holds the adaptation lane on one request (the plug) so that the requests sent next queue behind it.

    ``arm()``, then send the plug: its view encode (a call with several images) is held until ``release()``.
    Requests sent meanwhile wait in the lane's queue; once released, the lane takes them together, so a
    test of stacking does not depend on how fast they arrive.
    """

    def __init__(self) -> None:
        self.entered = threading.Event()
        self._gate = threading.Event()
        self._armed = False
        self._lock = threading.Lock()
        self.loader = gated_loader(self._gate, self.entered, hold=self._take)

    def _take(self, images: torch.Tensor) -> bool:
        with self._lock:
            if self._armed and images.shape[0] > 1:
                self._armed = False
                return True
            return False

    def arm(self) -> None:
        self.entered.clear()
        self._gate.clear()
        with self._lock:
            self._armed = True

    def wait_entered(self) -> None:
        assert self.entered.wait(PATIENCE_S), "the plug request never reached the lane"

    def release(self) -> None:
        self._gate.set()

    def stack(self, client: TestClient, method: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send ``requests`` (all with ``method``) while the lane is held on a plug, so that they wait in its
        queue together; release the lane once they all wait. Returns each request's first result."""
        self.arm()
        with ThreadPoolExecutor(len(requests) + 1) as pool:
            plugged = pool.submit(client.post, "/v1/classify", json=plug(method))
            self.wait_entered()
            futures = [pool.submit(client.post, "/v1/classify", json=r) for r in requests]
            wait_until(
                lambda: metric(client.get("/metrics").text, "tta_queue_depth") == len(requests),
                f"{len(requests)} requests to wait in the lane",
            )
            self.release()
            assert plugged.result().status_code == 200
            return [f.result().json()["results"][0] for f in futures]
