"""Calibration on the user's own data: POST labelled images of a label set, and its answers use the fit."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from server.api import create_app
from server.service.confidence import ConfidenceModel
from tests.support.apps import PATIENCE_S, metric, wait_ready, wait_until
from tests.support.gates import LaneHold, gated_loader
from tests.support.images import b64, png_bytes
from tests.support.model import write_tiny_model
from tests.support.requests import plug

LABELS = ["red", "green", "blue"]
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def labelled(n: int) -> tuple[list[str], list[str]]:
    """``n`` images of noisy colour patches and their labels."""
    images, labels = [], []
    for i in range(n):
        label = LABELS[i % 3]
        base = torch.tensor(COLOURS[label]).view(1, 1, 3).float()
        noise = torch.randn(24, 24, 3, generator=torch.Generator().manual_seed(i)) * 60
        pixels = (base + noise).clamp(0, 255).to(torch.uint8).numpy()

        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        images.append(b64(buf.getvalue()))
        labels.append(label)
    return images, labels


def fitted(client: TestClient, name: str = "colours") -> dict:
    wait_until(
        lambda: client.get(f"/v1/label-sets/{name}/calibration").json()["fit"]["state"] != "running",
        "the calibration to end",
    )
    status = client.get(f"/v1/label-sets/{name}/calibration").json()
    assert status["fit"]["state"] == "fitted", status
    return status


def confidence(client: TestClient, image: str, **where) -> float:
    """The answer's own calibrated score (its confidence before the 1/C floor)."""
    r = client.post("/v1/classify", json={"images": [image], **where})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["predictions"][0]["score"]


def calibrate(client: TestClient, images: list[str], labels: list[str], name: str = "colours") -> int:
    return client.post(f"/v1/label-sets/{name}/calibration", json={"images": images, "labels": labels}).status_code


def test_a_label_sets_calibration_is_fitted_applied_and_survives_a_restart(settings):
    images, labels = labelled(40)
    probe = b64(png_bytes(seed=123))
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert c.post("/v1/label-sets", json={"name": "colours", "labels": LABELS}).status_code == 201
        default = confidence(c, probe, label_set="colours")
        r = c.post("/v1/label-sets/colours/calibration", json={"images": images, "labels": labels})
        assert r.status_code == 202, r.text
        assert r.headers["location"] == "/v1/label-sets/colours/calibration"
        assert r.json()["fit"]["images"] == 40 and r.json()["fit"]["total"] == 40
        status = fitted(c)
        (only,) = status["calibrations"]
        assert only["method"] == "zero_shot" and only["applies"] is True and only["images"] == 40
        held = only["held_out"]
        assert held["images"] == 20 and set(held["ece"]) == {"raw", "before", "after"}
        calibrated = confidence(c, probe, label_set="colours")
        assert calibrated != pytest.approx(default, abs=1e-6)
        # The same labels sent inline are not the label set: the label-free default answers them.
        assert confidence(c, probe, labels=LABELS) == pytest.approx(default, abs=1e-6)
        # An adapted method on the label set is calibrated by the set's zero_shot fit.
        assert (
            c.post("/v1/classify", json={"images": [probe], "label_set": "colours", "method": "tps"}).status_code == 200
        )
    with TestClient(create_app(settings)) as c:  # a restart: the calibration is kept with the label set
        wait_ready(c)
        assert c.get("/v1/label-sets/colours/calibration").json()["calibrations"][0]["applies"] is True
        assert confidence(c, probe, label_set="colours") == pytest.approx(calibrated, abs=1e-6)
        assert c.delete("/v1/label-sets/colours/calibration").status_code == 204
        assert confidence(c, probe, label_set="colours") == pytest.approx(default, abs=1e-6)


def test_a_calibration_does_not_outlive_its_label_set_or_its_model(settings, tmp_path):
    images, labels = labelled(20)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        c.post("/v1/label-sets", json={"name": "colours", "labels": LABELS})
        assert calibrate(c, images, labels) == 202
        assert fitted(c)["calibrations"][0]["applies"] is True
        # Deleted with its label set; a set created again under the name starts without it.
        assert c.delete("/v1/label-sets/colours").status_code == 204
        c.post("/v1/label-sets", json={"name": "colours", "labels": LABELS})
        assert c.get("/v1/label-sets/colours/calibration").json()["calibrations"] == []
        calibrate(c, images, labels)
        fitted(c)
    other = write_tiny_model(tmp_path / "other", seed=1)
    settings.model = f"local-dir:{other}"
    with TestClient(create_app(settings)) as c:  # the same data directory, another model
        wait_ready(c)
        (record,) = c.get("/v1/label-sets/colours/calibration").json()["calibrations"]
        assert record["applies"] is False
        probe = b64(png_bytes(seed=7))
        result = c.post("/v1/classify", json={"images": [probe], "label_set": "colours", "top_k": 3}).json()
        top = result["results"][0]["predictions"]
        logits = torch.tensor([[p["logit"] for p in top]])
        assert top[0]["score"] == pytest.approx(float(ConfidenceModel.default().predict(logits)[0]), abs=1e-5)


def test_a_long_fit_reports_progress_and_runs_beside_live_traffic(settings):
    settings.max_images_per_request = 20  # the fit classifies 40 images in two requests
    gate, entered, armed = threading.Event(), threading.Event(), threading.Event()
    hold = gated_loader(gate, entered, hold=lambda images: armed.is_set() and images.shape[0] == 20)
    images, labels = labelled(40)
    with TestClient(create_app(settings, load=hold)) as c:
        wait_ready(c)
        c.post("/v1/label-sets", json={"name": "colours", "labels": LABELS})
        armed.set()
        assert (
            c.post("/v1/label-sets/colours/calibration", json={"images": images, "labels": labels}).status_code == 202
        )
        assert entered.wait(PATIENCE_S)  # the fit's first request is in the engine
        fit = c.get("/v1/label-sets/colours/calibration").json()["fit"]
        assert (fit["state"], fit["done"], fit["total"]) == ("running", 0, 40)
        armed.clear()
        gate.set()
        fit = fitted(c)["fit"]
        assert (fit["done"], fit["remaining_s"]) == (40, None)
        assert (
            c.post("/v1/label-sets/colours/calibration", json={"images": images, "labels": labels}).status_code == 202
        )


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"images": ["x"] * 20, "labels": ["red"] * 19}, 422, "unlabelled_images"),
        ({"images": ["x"] * 5, "labels": ["red"] * 5}, 422, "too_few_images"),
        ({"images": ["x"] * 20, "labels": ["red"] * 19 + ["purple"]}, 422, "unknown_label"),
        ({"images": ["x"] * 20, "labels": ["red"] * 20, "methods": ["nope"]}, 422, "unknown_method"),
        ({"images": ["x"] * 20}, 422, "validation_error"),
        ({"images": ["x"] * 20, "labels": ["red"] * 20, "extra": 1}, 422, "validation_error"),
    ],
)
def test_bad_calibration_requests_are_refused_with_a_clear_4xx(client, body, status, code):
    client.post("/v1/label-sets", json={"name": "colours", "labels": LABELS})
    r = client.post("/v1/label-sets/colours/calibration", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def test_calibration_requests_that_cannot_be_read(client):
    client.post("/v1/label-sets", json={"name": "colours", "labels": LABELS})
    r = client.post("/v1/label-sets/nope/calibration", json={"images": ["x"] * 20, "labels": ["red"] * 20})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "unknown_label_set")
    r = client.post("/v1/label-sets/colours/calibration", content=b"{", headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
    r = client.post("/v1/label-sets/colours/calibration", content=b"x", headers={"content-type": "image/png"})
    assert r.status_code == 415
    # Undecodable images are found by the fit, which fails and says why.
    r = client.post("/v1/label-sets/colours/calibration", json={"images": ["x"] * 20, "labels": ["red"] * 20})
    assert r.status_code == 202
    wait_until(lambda: client.get("/v1/label-sets/colours/calibration").json()["fit"]["state"] != "running", "the fit")
    fit = client.get("/v1/label-sets/colours/calibration").json()["fit"]
    assert fit["state"] == "failed" and "base64" in fit["error"]


def test_a_multipart_calibration(client):
    images, labels = labelled(20)
    client.post("/v1/label-sets", json={"name": "colours", "labels": LABELS})
    files = [("image", (f"{i}.png", base64.b64decode(img), "image/png")) for i, img in enumerate(images)]
    r = client.post("/v1/label-sets/colours/calibration", files=files, data={"labels": labels})
    assert r.status_code == 202, r.text
    assert fitted(client)["calibrations"][0]["images"] == 20


def test_a_fit_answered_zero_shot_for_overload_tries_again_rather_than_learn_from_it(settings):
    settings.adapt_budget_s = 1e-6  # any admitted work fills the adaptation lane
    settings.adapt_max_batch = 10  # the fit classifies its 20 images with tps in two requests
    lane = LaneHold()
    images, labels = labelled(20)
    with TestClient(create_app(settings, load=lane.loader)) as c:
        wait_ready(c)
        c.post("/v1/label-sets", json={"name": "colours", "labels": LABELS})
        lane.arm()
        with ThreadPoolExecutor(1) as pool:
            plugged = pool.submit(c.post, "/v1/classify", json=plug("tps"))
            lane.wait_entered()  # the lane is busy: the fit's first request is served zero-shot, "overload"
            body = {"images": images, "labels": labels, "methods": ["tps"]}
            assert c.post("/v1/label-sets/colours/calibration", json=body).status_code == 202
            overloaded = 'tta_adapt_skipped_total{reason="overload"}'
            wait_until(lambda: metric(c.get("/metrics").text, overloaded) >= 10, "the fit to be served zero-shot")
            assert c.get("/v1/label-sets/colours/calibration").json()["fit"]["done"] == 0  # not counted, not kept
            lane.release()
            assert plugged.result().status_code == 200
        assert fitted(c)["calibrations"][0]["method"] == "tps"
        text = c.get("/metrics").text
        assert metric(text, 'tta_requests_total{method="tps",outcome="success"}') >= 3  # two chunks and a retry
