"""Rate limits per key, counted in images (adapted ones weighted by their cost), and CORS as a setting.

The app's bucket clock is replaced by one the test moves by hand: no test waits for tokens to come back.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from server.api import create_app
from server.settings import Settings
from tests.support.apps import metric, wait_ready
from tests.support.images import b64, png_bytes

ALICE = "alice-0123456789abcdef"
BOB = "bob-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited(settings: Settings, rps: float, burst: float, keys: bool = True) -> tuple[TestClient, Clock]:
    update: dict[str, object] = {"rate_limit_rps": rps, "rate_limit_burst": burst}
    if keys:
        update["api_keys"] = SecretStr(f"alice:{ALICE},bob:{BOB}")
    app = create_app(settings.model_copy(update=update))
    clock = Clock()
    app.state.rate_limits.clock = clock
    return TestClient(app), clock


@pytest.fixture
def image() -> str:
    return b64(png_bytes())


def classify(client: TestClient, images: list[str], key: str | None = ALICE, **more: object):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/v1/classify", json={"images": images, "labels": ["red", "blue"], **more}, headers=headers)


def test_a_key_over_its_rate_gets_429_with_retry_after_and_others_go_on(settings, image):
    client, clock = limited(settings, rps=2, burst=4)
    with client as c:
        wait_ready(c)
        assert classify(c, [image] * 3).status_code == 200  # 3 of 4 images
        assert classify(c, [image]).status_code == 200  # the fourth
        r = classify(c, [image] * 3)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limited" and "'alice'" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "2"  # 3 images at 2/s
        assert classify(c, [image] * 4, key=BOB).status_code == 200  # each key has its own bucket
        clock.now += 1  # 2 images back: not yet 3
        assert classify(c, [image] * 3).json()["error"]["code"] == "rate_limited"
        assert classify(c, [image] * 3).headers["retry-after"] == "1"
        clock.now += 1
        assert classify(c, [image] * 3).status_code == 200  # refused requests took nothing
        text = c.get("/metrics").text
        assert metric(text, 'tta_rate_limited_total{reason="zero_shot"}') == 3
        assert metric(text, 'tta_rejected_total{reason="rate_limited"}') == 3
        assert metric(text, 'tta_requests_total{method="zero_shot",outcome="rejected"}') == 3


def test_an_adapted_image_costs_more_than_a_zero_shot_one(settings, image):
    client, _ = limited(settings, rps=1, burst=4)
    with client as c:
        wait_ready(c)
        for _ in range(4):  # zero-shot: one image, one token
            assert classify(c, [image], key=BOB).status_code == 200
        assert classify(c, [image], key=BOB).status_code == 429

        options = {"views": 8, "steps": 1}
        r = classify(c, [image], method="tpt", options=options)  # a full bucket lets a dear request run...
        assert r.status_code == 200, r.text
        r = classify(c, [image])  # ... and leaves it in debt: more than the 4 images' worth it holds
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 4
        assert "tpt" not in r.json()["error"]["message"]
        r = classify(c, [image], method="tpt", options=options)
        assert r.status_code == 429
        assert metric(c.get("/metrics").text, 'tta_rate_limited_total{reason="adaptation"}') == 1


def test_without_keys_the_limit_is_per_client_address(settings, image):
    client, clock = limited(settings, rps=1, burst=2, keys=False)
    with client as c:
        wait_ready(c)
        assert classify(c, [image] * 2, key=None).status_code == 200
        r = classify(c, [image], key=None)
        assert r.status_code == 429 and "client testclient" in r.json()["error"]["message"]
        clock.now += 1
        assert classify(c, [image], key=None).status_code == 200


def test_invalid_requests_are_refused_for_what_they_are_and_cost_nothing(settings, image):
    client, _ = limited(settings, rps=1, burst=1)
    with client as c:
        wait_ready(c)
        assert classify(c, [image], method="nope").json()["error"]["code"] == "unknown_method"
        assert classify(c, [image]).status_code == 200


def test_off_by_default(client, image):
    for _ in range(40):
        assert classify(client, [image], key=None).status_code == 200


def cors(settings: Settings, origins: str) -> TestClient:
    return TestClient(create_app(settings.model_copy(update={"cors_origins": origins})))


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


def test_cors_lets_a_configured_origin_in_and_no_other(settings, image):
    with cors(settings, "https://app.example, https://other.example") as c:
        r = c.options("/v1/classify", headers={"Origin": "https://app.example", **PREFLIGHT})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.options("/v1/classify", headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert "access-control-allow-origin" not in r.headers
        wait_ready(c)
        r = classify(c, [image], key=None, top_k=1)
        assert "access-control-allow-origin" not in r.headers  # no Origin (not a browser): nothing to allow
        r = c.post(
            "/v1/classify",
            json={"images": [image], "labels": ["red", "blue"]},
            headers={"Origin": "https://other.example"},
        )
        assert r.headers["access-control-allow-origin"] == "https://other.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


def test_cors_is_off_by_default(client):
    r = client.options("/v1/classify", headers={"Origin": "https://app.example", **PREFLIGHT})
    assert "access-control-allow-origin" not in r.headers
