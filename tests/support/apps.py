"""Waiting for an app or a condition, and reading what a server exposes (metrics) or holds (the backbone)."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from fastapi.testclient import TestClient

# How long a test waits for something that must happen before it gives up and fails. A failsafe against
# a hang, never what a test measures: waits end as soon as their condition holds.
PATIENCE_S = 120.0

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = PATIENCE_S) -> T:
    """Poll ``probe`` until it returns something other than None or False, and return that; fail naming
    ``what`` after ``timeout`` (a failsafe: the wait ends as soon as the probe has its answer)."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None and found is not False:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = PATIENCE_S) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it never does."""
    wait_for(lambda: condition() or None, what, timeout)


def wait_ready(client: TestClient) -> None:
    """Wait until the app's /readyz says 200 (the model is loaded and warm)."""
    wait_until(lambda: client.get("/readyz").status_code == 200, "the model to load")


def metric(text: str, name: str) -> float:
    """The value of one series in a Prometheus exposition (``name`` with its labels)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def state_hash(model: torch.nn.Module) -> str:
    """A digest of every weight and buffer: equal before and after means the model never changed."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
