"""The accuracy estimate without labels: mean calibrated confidence per label set, over a sliding window."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from tests.support.apps import metric, wait_ready
from tests.support.images import b64, png_bytes

LABELS = ["red", "green", "blue", "a cat"]


def confidences(client: TestClient, body: dict) -> list[float]:
    r = client.post("/v1/classify", json=body)
    assert r.status_code == 200, r.text
    return [result["confidence"] for result in r.json()["results"]]


def test_estimated_accuracy_is_the_mean_confidence_of_each_label_sets_window(settings):
    settings.accuracy_window = 5
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert c.post("/v1/label-sets", json={"name": "pets", "labels": LABELS}).status_code == 201
        seen = []
        for seed in range(3):  # 6 images: the window keeps the last 5
            images = [b64(png_bytes(seed=seed)), b64(png_bytes(seed=seed + 10, size=(30, 50)))]
            seen += confidences(c, {"images": images, "label_set": "pets"})
        inline = confidences(c, {"images": [b64(png_bytes(seed=99))], "labels": LABELS, "method": "tps"})
        text = c.get("/metrics").text
        assert metric(text, 'tta_estimated_accuracy{label_set="pets"}') == pytest.approx(sum(seen[-5:]) / 5)
        assert metric(text, 'tta_estimated_accuracy_images{label_set="pets"}') == 5
        assert metric(text, 'tta_estimated_accuracy{label_set="inline"}') == pytest.approx(inline[0])
        # A deleted label set's series goes with it: the label values stay bounded by the store.
        assert c.delete("/v1/label-sets/pets").status_code == 204
        text = c.get("/metrics").text
        assert 'label_set="pets"' not in text and 'tta_estimated_accuracy{label_set="inline"}' in text
