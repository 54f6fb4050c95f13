"""The OpenAPI document tells the truth: its examples work as they are, its bodies list what the server reads,
every answer has a schema (errors in the one error shape), its headers and limits are the server's."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.settings import DEMO_MODEL_DIR, Settings
from tests.conftest import RELAXED_TIMEOUT_S
from tests.support.apps import wait_ready, wait_until
from tests.support.images import png_bytes
from tests.support.servers import ROOT

HTTP_METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method, path, operation


@pytest.fixture
def spec(client) -> dict[str, Any]:
    return client.get("/openapi.json").json()


@pytest.fixture
def demo_client(tmp_path) -> Iterator[TestClient]:
    """The server as `python -m server` starts it: the demo model, which the examples are written for."""
    if not (DEMO_MODEL_DIR / "open_clip_config.json").is_file():
        pytest.skip("demo model not shipped")
    settings = Settings(data_dir=tmp_path / "data", device="cpu", request_timeout_s=RELAXED_TIMEOUT_S, _env_file=None)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def test_the_documented_examples_work_as_they_are(demo_client):
    spec = demo_client.get("/openapi.json").json()
    examples = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) == {"labels", "label_set", "video", "session"}
    for name, example in examples.items():
        answer = demo_client.post("/v1/classify", json=example["value"])
        assert answer.status_code == 200, (name, answer.text)
    session = examples["session"]["value"]["session"]
    assert demo_client.get(f"/v1/sessions/{session}").json()["requests"] == 1
    answer = demo_client.post("/v1/classify", json=examples["labels"]["value"]).json()
    assert answer["results"][0]["label"] == "red star"
    assert [p["label"] for p in answer["results"][0]["predictions"]][:1] == ["red star"]
    assert answer["results"][0]["predictions"][0]["probability"] > 0.5
    video = demo_client.post("/v1/classify", json=examples["video"]["value"]).json()
    assert [r["label"] for r in video["results"]] == ["red star"]  # a video is one answer

    label_set = spec["components"]["schemas"]["LabelSetIn"]["examples"][0]
    assert demo_client.post("/v1/label-sets", json=label_set).status_code == 201

    calibration = spec["paths"]["/v1/label-sets/{name}/calibration"]["post"]["requestBody"]["content"]
    body = calibration["application/json"]["examples"]["demo"]["value"]
    started = demo_client.post("/v1/label-sets/demo-shapes/calibration", json=body)
    assert started.status_code == 202, started.text
    assert started.headers["location"] == "/v1/label-sets/demo-shapes/calibration"

    def fit_state() -> str:
        return str(demo_client.get("/v1/label-sets/demo-shapes/calibration").json()["fit"]["state"])

    wait_until(lambda: fit_state() != "running", "the example calibration to end")
    assert fit_state() == "fitted"


def test_the_example_images_are_those_of_docs_examples(spec):
    json_body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]
    image = json_body["examples"]["labels"]["value"]["images"][0]
    assert base64.b64decode(image, validate=True) == (ROOT / "docs/examples/red_star.png").read_bytes()
    calibration = spec["paths"]["/v1/label-sets/{name}/calibration"]["post"]["requestBody"]["content"]
    body = calibration["application/json"]["examples"]["demo"]["value"]
    files = {(ROOT / "docs/examples" / f"{label.replace(' ', '_')}.png").read_bytes() for label in body["labels"]}
    assert {base64.b64decode(i, validate=True) for i in body["images"]} == files


def test_the_multipart_schema_lists_every_field_the_server_accepts(client, spec):
    form = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    documented = set(form["properties"])
    refused = client.post("/v1/classify", files={"image": png_bytes()}, data={"colour": "red"})
    assert refused.status_code == 422
    accepted = re.search(r"accepted: ([a-z_, ]+)", refused.json()["error"]["message"])
    assert accepted and set(accepted.group(1).split(", ")) == documented

    # Every documented field, with a value its schema allows, is read.
    fields = {
        "labels": ["red", "blue"],
        "templates": "simple",
        "top_k": "2",
        "method": "zero_shot",
        "options": "{}",
        "seed": "3",
        "compare": "true",
        "abstain_below": "0.0",
        "confidence_gate": "0.5",
        "session": "form-7",
        "session_method": "stats",
    }
    video = {"num_frames": "2", "sampling": "uniform", "pooling": "max"}
    adapter = {"adapter", "adapter_alpha"}  # a session and an adapter are refused together: posted apart below
    assert documented == {"image", "label_set", "frame", "video", *fields, *video, *adapter}
    answer = client.post("/v1/classify", files={"image": png_bytes()}, data=fields)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["results"][0]["predictions"]) == 2
    assert answer.json()["results"][0]["zero_shot"]["predictions"]  # compare=true
    assert answer.json()["results"][0]["session"]["session_method"] == "stats"
    frames = [("frame", png_bytes(seed=i)) for i in range(3)]
    unsessioned = {k: v for k, v in fields.items() if not k.startswith("session")}
    answer = client.post("/v1/classify", files=frames, data={**unsessioned, **video})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["results"]) == 1  # one video, one answer
    for form, code in (
        ({"adapter_alpha": "0.5"}, "adapter_alpha_without_adapter"),
        ({"adapter": "x"}, "unknown_adapter"),
    ):
        refused = client.post("/v1/classify", files={"image": png_bytes()}, data={"labels": ["red"], **form})
        assert refused.json()["error"]["code"] == code  # read and acted on, not ignored


def test_every_success_answer_has_a_schema_and_metrics_is_text(client, spec):
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            if not status.startswith("2") or status == "204":
                continue
            content = response["content"]
            if path == "/metrics":
                assert content == {"text/plain": {"schema": {"type": "string"}}}
            elif path == "/v1/adapters/{ref}/artifact":
                assert set(content) == {"application/octet-stream"}
            else:
                assert set(content) == {"application/json"}, (method, path)
                assert content["application/json"]["schema"]["$ref"].startswith("#/components/schemas/"), (method, path)
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    models = spec["components"]["schemas"]["ModelList"]
    assert models["properties"]["models"]["items"] == {"$ref": "#/components/schemas/ModelInfo"}
    assert client.get("/v1/models").json()["models"][0]["ready"] is True


def test_every_error_answer_is_documented_in_the_error_shape(client, spec):
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
    assert "HTTPValidationError" not in json.dumps(spec)
    error = spec["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["error"]
    assert set(spec["components"]["schemas"]["ErrorDetail"]["required"]) == {"code", "message", "request_id"}
    # What the 422 of a label set's page documents is what the server answers.
    assert "422" in spec["paths"]["/v1/label-sets/{name}"]["get"]["responses"]
    missing = client.get("/v1/label-sets/nothing-here")
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


def test_the_headers_are_documented(client, spec):
    for method, path, operation in operations(spec):
        names = [p["name"] for p in operation["parameters"] if p["in"] == "header"]
        assert "X-Request-ID" in names, (method, path)
        for status, response in operation["responses"].items():
            assert response["headers"]["X-Request-ID"]["required"] is True, (method, path, status)
            if status in ("429", "503"):
                assert "Retry-After" in response["headers"], (method, path, status)
    classify = spec["paths"]["/v1/classify"]["post"]
    assert "X-Request-Timeout" in [p["name"] for p in classify["parameters"]]
    calibrate = spec["paths"]["/v1/label-sets/{name}/calibration"]["post"]
    assert "Location" in calibrate["responses"]["202"]["headers"]
    assert "Location" in spec["paths"]["/v1/jobs/finetune"]["post"]["responses"]["202"]["headers"]
    # ...and the server sends them.
    answer = client.get("/v1/label-sets", headers={"X-Request-ID": "my-request-7"})
    assert answer.headers["x-request-id"] == "my-request-7"


def test_operation_ids_are_readable_and_unique(spec):
    ids = [operation["operationId"] for _, _, operation in operations(spec)]
    assert len(ids) == len(set(ids))
    assert set(ids) == {
        "classify",
        "listLabelSets",
        "createLabelSet",
        "getLabelSet",
        "deleteLabelSet",
        "calibrateLabelSet",
        "getCalibration",
        "deleteCalibration",
        "listModels",
        "listMethods",
        "getSession",
        "deleteSession",
        "uploadAdapter",
        "listAdapters",
        "getAdapter",
        "downloadAdapter",
        "deleteAdapter",
        "mergeAdapterGroup",
        "submitFinetune",
        "listJobs",
        "getJob",
        "cancelJob",
        "healthz",
        "readyz",
        "metrics",
    }


def test_the_schema_bounds_requests_by_the_servers_limits(settings):
    settings = settings.model_copy(update={"max_top_k": 7, "max_labels": 4, "max_images_per_request": 3})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        spec = client.get("/openapi.json").json()
        body = spec["components"]["schemas"]["ClassifyRequest"]["properties"]
        top_k = next(b for b in body["top_k"]["anyOf"] if b["type"] == "integer")
        assert (top_k["minimum"], top_k["maximum"]) == (1, 7)
        labels = next(b for b in body["labels"]["anyOf"] if b["type"] == "array")
        assert (labels["minItems"], labels["maxItems"]) == (1, 4)
        images = next(b for b in body["images"]["anyOf"] if b["type"] == "array")
        assert images["maxItems"] == 3
        video = spec["components"]["schemas"]["VideoIn"]["properties"]
        frames = next(b for b in video["frames"]["anyOf"] if b["type"] == "array")
        num_frames = next(b for b in video["num_frames"]["anyOf"] if b["type"] == "integer")
        assert frames["maxItems"] == num_frames["maximum"] == settings.max_frames
        form = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["properties"]["top_k"]["maximum"] == 7
        label_set = spec["components"]["schemas"]["LabelSetIn"]["properties"]["labels"]
        assert label_set["minItems"] == 1

        # The bounds are where the server draws its lines.
        image = base64.b64encode(png_bytes()).decode()
        labels_ = ["red", "green"]
        assert client.post("/v1/classify", json={"images": [image], "labels": labels_, "top_k": 7}).status_code == 200
        too_many = client.post("/v1/classify", json={"images": [image], "labels": labels_, "top_k": 8})
        assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "invalid_top_k"
        empty = client.post("/v1/label-sets", json={"name": "empty", "labels": []})
        assert empty.status_code == 422 and empty.json()["error"]["code"] == "no_labels"


def test_a_405_allows_every_method_of_the_path(client, spec):
    for path, concrete in (("/v1/label-sets/{name}", "/v1/label-sets/x"), ("/v1/classify", "/v1/classify")):
        documented = {m.upper() for m in spec["paths"][path]}
        answer = client.put(concrete, json={})
        assert answer.status_code == 405 and answer.json()["error"]["code"] == "method_not_allowed"
        assert set(answer.headers["allow"].split(", ")) == documented
