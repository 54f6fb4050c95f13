"""A client generated from the live server's OpenAPI document (openapi-python-client) imports and works:
it classifies an example image, as JSON and as multipart, and reads the error shape with the request id."""

from __future__ import annotations

import base64
import importlib
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import httpx
import pytest

from server.api import create_app
from tests.support.servers import ROOT, serve_in_thread

PACKAGE = "ttaserve_generated"
RED_STAR = ROOT / "docs/examples/red_star.png"
LABELS = ["red", "green", "blue"]  # the tiny test model's colours


@pytest.fixture
def url(settings) -> Iterator[str]:
    with serve_in_thread(create_app(settings)) as served:
        yield served


@pytest.fixture
def generated(url, tmp_path) -> Iterator[ModuleType]:
    """Generate the client package from ``url``'s /openapi.json into ``tmp_path`` and import it."""
    spec = tmp_path / "openapi.json"
    spec.write_bytes(httpx.get(f"{url}/openapi.json").content)
    config = tmp_path / "config.yml"
    config.write_text("post_hooks: []\n")  # no formatter run on the output: it is imported, not read
    command = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(spec), "--meta", "none"]
    command += ["--output-path", str(tmp_path / PACKAGE), "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def test_a_generated_client_classifies_an_example_image(url, generated):
    classify = importlib.import_module(f"{PACKAGE}.api.classify.classify")
    models = importlib.import_module(f"{PACKAGE}.models")
    types = importlib.import_module(f"{PACKAGE}.types")
    image = base64.b64encode(RED_STAR.read_bytes()).decode()

    with generated.Client(base_url=url) as client:
        as_json = classify.sync(client=client, body=models.ClassifyRequest(images=[image], labels=LABELS, top_k=3))
        upload = types.File(payload=RED_STAR.open("rb"), file_name="red_star.png", mime_type="image/png")
        form = models.ClassifyFilesBody(image=[upload], labels=LABELS, top_k=3, compare=True)
        as_form = classify.sync(client=client, body=form)

    for answer in (as_json, as_form):
        assert isinstance(answer, models.ClassifyResponse), answer
        (result,) = answer.results
        assert result.label in LABELS
        assert result.label == result.predictions[0].label
        assert 0 < result.confidence <= 1
        assert {p.label for p in result.predictions} == set(LABELS)
        assert sum(p.probability for p in result.predictions) == pytest.approx(1, abs=1e-4)
        assert answer.method == "zero_shot"
    assert as_form.results[0].label == as_json.results[0].label  # the same image, two body forms
    assert as_form.results[0].zero_shot.label == as_json.results[0].label


def test_a_generated_client_reads_label_sets_and_errors(url, generated):
    list_label_sets = importlib.import_module(f"{PACKAGE}.api.label_sets.list_label_sets")
    get_label_set = importlib.import_module(f"{PACKAGE}.api.label_sets.get_label_set")
    models = importlib.import_module(f"{PACKAGE}.models")

    with generated.Client(base_url=url) as client:
        listed = list_label_sets.sync(client=client)
        missing = get_label_set.sync(client=client, name="nothing-here", x_request_id="lookup-1")

    assert isinstance(listed, models.LabelSetList)
    assert [(s.name, s.labels, s.source) for s in listed.label_sets] == [("tiny-colours", LABELS, "model")]
    assert isinstance(missing, models.ErrorBody)
    assert (missing.error.code, missing.error.request_id) == ("unknown_label_set", "lookup-1")
