"""A client that goes away mid-adaptation, through a real HTTP server (uvicorn, loopback, in this process).

The backbone's text encoder is held at the first adaptation step until the test opens its gate: the
test knows the adaptation is under way when the client leaves, and can count the steps run after it.
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.clip import load_backbone
from tests.support.apps import PATIENCE_S, metric, wait_ready, wait_until
from tests.support.images import b64, png_bytes
from tests.support.servers import serve_in_thread

LABELS = ("red", "green", "blue")
STEPS = 10


def held_at_step_one(entered: threading.Event, release: threading.Event, steps: list[int]):
    """A loader whose text tower counts the request's passes in ``steps`` and holds the first until ``release``."""

    def load(settings_, spec):
        backbone = load_backbone(settings_, spec)
        encode = backbone.encode_text_with_contexts

        def held(ctx, inputs):
            if inputs[0].labels == LABELS:  # the request's prompts, not the start-up measurement's
                steps.append(len(steps) + 1)
                if len(steps) == 1:
                    entered.set()
                    release.wait(PATIENCE_S)
            return encode(ctx, inputs)

        backbone.encode_text_with_contexts = held
        return backbone

    return load


def test_a_client_that_disconnects_stops_its_adaptation(settings, caplog):
    entered, release = threading.Event(), threading.Event()
    steps: list[int] = []  # one entry per pass of the request's prompts through the text tower
    load = held_at_step_one(entered, release, steps)

    caplog.set_level(logging.INFO)
    body = json.dumps(
        {
            "images": [b64(png_bytes(seed=1, size=(80, 64)))],
            "labels": list(LABELS),
            "method": "tpt",
            "options": {"views": 8, "steps": STEPS},
        }
    ).encode()
    with serve_in_thread(create_app(settings, load=load)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            assert entered.wait(PATIENCE_S), "the adaptation never reached its first step"
        # The client is gone while step 1 of 10 is held. The server notices and answers nobody.
        cancelled = 'tta_requests_total{method="tpt",outcome="cancelled"}'

        def counted() -> bool:
            text = httpx.get(f"{url}/metrics", timeout=PATIENCE_S).text
            return cancelled in text and metric(text, cancelled) == 1

        wait_until(counted, "the request to be counted as cancelled")
        release.set()
        # The lane runs one batch at a time: this answer comes once the abandoned one has stopped.
        after = httpx.post(
            f"{url}/v1/classify",
            json={"images": [b64(png_bytes())], "labels": ["a", "b"], "method": "tpt", "options": {"views": 4}},
            timeout=PATIENCE_S,
        )
        assert after.status_code == 200, after.text
    # Step 1 finished; the lane stopped before step 2 instead of running 10 steps and a final prediction.
    assert steps == [1], f"{len(steps)} text passes ran for a request whose client had gone"
    gc.collect()  # a failed future nobody read complains when it is collected
    messages = [r.getMessage() for r in caplog.records]
    assert any("stopped before step 2 of 10" in m and "the client went away" in m for m in messages), messages
    assert not any("never retrieved" in m for m in messages), messages
    assert not [m for r in caplog.records if r.levelno >= logging.ERROR for m in [r.getMessage()]], messages


def test_a_request_past_its_deadline_stops_its_adaptation_and_says_why(settings, caplog):
    entered, release = threading.Event(), threading.Event()
    steps: list[int] = []
    load = held_at_step_one(entered, release, steps)

    caplog.set_level(logging.INFO, logger="ttaserve")
    body = {
        "images": [b64(png_bytes(seed=1, size=(80, 64)))],
        "labels": list(LABELS),
        "method": "tpt",
        "options": {"views": 8, "steps": STEPS},
    }
    with TestClient(create_app(settings, load=load)) as client:
        wait_ready(client)
        # Step 1 is held past the request's own deadline (the server's stays at 600 s for the next one).
        r = client.post("/v1/classify", json=body, headers={"X-Request-Timeout": "0.2"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert entered.is_set()
        release.set()
        after = client.post("/v1/classify", json={**body, "labels": ["a", "b"], "options": {"views": 4}})
        assert after.status_code == 200, after.text
    assert steps == [1], f"{len(steps)} text passes ran for a request past its deadline"
    messages = [r.getMessage() for r in caplog.records]
    stops = [m for m in messages if "stopped" in m or "went away" in m or "deadline" in m]
    assert any("stopped before step 2 of 10" in m and "past the deadline" in m for m in messages), stops
    assert not any("went away" in m for m in messages), messages


def multipart(image: bytes) -> tuple[str, bytes]:
    boundary = "tta-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n{json.dumps(list(LABELS))}\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


@pytest.mark.parametrize("kind", ["json", "multipart"])
def test_a_client_that_disconnects_mid_upload_is_logged_as_gone_not_as_an_error(settings, caplog, kind):
    caplog.set_level(logging.INFO)
    image = png_bytes(seed=2, size=(200, 200))
    if kind == "json":
        ctype, body = "application/json", json.dumps({"images": [b64(image)], "labels": list(LABELS)}).encode()
    else:
        ctype, body = multipart(image)
    with serve_in_thread(create_app(settings)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nX-Request-ID: gone\r\n"
                b"Content-Length: %d\r\n\r\n" % (ctype.encode(), len(body)) + body[: len(body) // 2]
            )
            wait_until(
                lambda: metric(httpx.get(f"{url}/metrics", timeout=PATIENCE_S).text, "tta_http_inflight_requests") == 1,
                "the upload to be in flight",
            )
        # The client left half-way through its body.
        wait_until(
            lambda: any(r.name == "ttaserve.access" and r.request_id == "gone" for r in caplog.records),
            "the request's access line",
        )
        again = httpx.post(f"{url}/v1/classify", content=body, headers={"content-type": ctype}, timeout=PATIENCE_S)
        assert again.status_code == 200, again.text
    gc.collect()
    access = [r.getMessage() for r in caplog.records if r.name == "ttaserve.access" and r.request_id == "gone"]
    assert access == [access[0]] and access[0].startswith("POST /v1/classify 499 "), access
    errors = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    assert any("499 client_closed_request" in r.getMessage() for r in caplog.records if r.request_id == "gone")
