"""API keys: who may call what, what each key sees of the others' state, and what the logs say about it."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from server.api import create_app
from server.api.auth import CLASSIFY_ROUTES
from server.errors import ConfigError
from server.settings import Settings
from server.storage.base import AdapterRecord, JobRecord
from tests.integration.test_calibration import LABELS, labelled
from tests.support.apps import metric, wait_ready, wait_until
from tests.support.images import b64, png_bytes

ALICE_ADMIN = "alice-admin-0123456789abcdef"
ALICE = "alice-classify-0123456789abcdef"  # the same name, so the same tenant, without admin rights
BOB_ADMIN = "bob-admin-0123456789abcdef"
CAROL = "carol-classify-0123456789abcdef"
OPEN_PATHS = {"/healthz", "/readyz", "/metrics"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keyed(settings: Settings, **more: object) -> Settings:
    return settings.model_copy(
        update={
            "api_keys": SecretStr(f"alice:{ALICE}, carol:{CAROL}"),
            "admin_api_keys": SecretStr(f"alice:{ALICE_ADMIN},bob:{BOB_ADMIN}"),
            **more,
        }
    )


@pytest.fixture
def keyed_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(keyed(settings)), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "tiny-colours", path)


def routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path) the app answers: its routes, those of the routers it includes (FastAPI 0.165 keeps
    them behind an included-router object), and, in case a later FastAPI hides them otherwise, the OpenAPI
    document's operations."""
    found: set[tuple[str, str]] = set()

    def walk(route: object, path: str | None = None) -> None:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:
            for context in contexts():
                walk(context.original_route, context.path)
            return
        for method in getattr(route, "methods", None) or ():
            found.add((method, path or route.path))  # type: ignore[attr-defined]

    for route in app.routes:
        walk(route)
    for path, operations in app.openapi()["paths"].items():
        found |= {(method.upper(), path) for method in operations}
    return found


def test_every_state_changing_route_refuses_a_classify_key_and_asks_for_a_key(keyed_client):
    """Enumerates the app's routes, so an endpoint added later is checked without a line here."""
    checked = []
    for method, route_path in sorted(routes(keyed_client.app)):
        # Classifying and resetting one's own session change nothing another tenant sees: any key may (see
        # test_sessions.py); they still need a key, as every API route does (the next test).
        if method in {"POST", "PUT", "PATCH", "DELETE"} and (method, route_path) not in CLASSIFY_ROUTES:
            path = concrete(route_path)
            for key, status, code in (
                (None, 401, "unauthorized"),
                (CAROL, 403, "forbidden"),
                (ALICE, 403, "forbidden"),
            ):
                r = keyed_client.request(method, path, headers=bearer(key) if key else {})
                assert r.status_code == status, (method, route_path, key, r.text)
                assert r.json()["error"]["code"] == code and r.json()["error"]["request_id"]
                assert r.headers["www-authenticate"].startswith("Bearer")
            checked.append((method, route_path))
    assert len(checked) >= 4, checked  # label sets (create, delete) and calibrations (start, drop) at least
    # Refused before anything happened: the shipped label set is still there, nothing was created.
    r = keyed_client.get("/v1/label-sets", headers=bearer(ALICE_ADMIN))
    assert [s["name"] for s in r.json()["label_sets"]] == ["tiny-colours"]


def test_every_api_route_asks_for_a_key_and_health_and_metrics_stay_open(keyed_client):
    api = sorted(path for method, path in routes(keyed_client.app) if method == "GET" and path.startswith("/v1/"))
    assert len(api) >= 5, api
    # Carol's session of the id the paths are filled with, so that GET /v1/sessions/{session_id} finds one.
    seen = {"images": [b64(png_bytes())], "labels": ["red", "blue"], "session": concrete("{session_id}")}
    assert keyed_client.post("/v1/classify", json=seen, headers=bearer(CAROL)).status_code == 200
    # Carol's adapter of that name (a classify key cannot upload one: it is put in the store directly).
    record = AdapterRecord(concrete("{ref}"), 0, {"type": "apex"}, "0" * 64, 1, owner="carol")
    keyed_client.app.state.runtime.store.add_adapter(record, b"x")  # type: ignore[attr-defined]
    # And her job of that id (ended: the runner leaves it alone).
    job = JobRecord(concrete("{job_id}"), "finetune", "cancelled", {}, owner="carol")
    keyed_client.app.state.runtime.store.create_job(job, b"")  # type: ignore[attr-defined]
    for path in api:
        assert keyed_client.get(concrete(path)).status_code == 401, path
        assert keyed_client.get(concrete(path), headers=bearer(CAROL)).status_code == 200, path
    for path in OPEN_PATHS:
        assert keyed_client.get(path).status_code == 200, path
    schema = keyed_client.get("/openapi.json").json()  # the docs page offers to send a key
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/v1/classify"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    image = b64(png_bytes())
    body = {"images": [image], "labels": ["red", "blue"]}
    assert keyed_client.post("/v1/classify", json=body).status_code == 401
    assert keyed_client.post("/v1/classify", json=body, headers=bearer(CAROL)).status_code == 200
    assert keyed_client.post("/v1/classify", json=body, headers=bearer(BOB_ADMIN)).status_code == 200


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (None, "needs an API key"),
        (f"Basic {ALICE}", "must be 'Bearer KEY'"),
        ("Bearer ", "must be 'Bearer KEY'"),
        (f"Bearer {ALICE}x", "not valid"),
        (f"Bearer {ALICE[:-1]}", "not valid"),
    ],
)
def test_a_missing_or_wrong_key_is_a_401_with_a_challenge(keyed_client, header, says):
    r = keyed_client.get("/v1/label-sets", headers={"Authorization": header} if header else {})
    assert r.status_code == 401
    error = r.json()["error"]
    assert error["code"] == "unauthorized" and says in error["message"] and error["request_id"]
    assert r.headers["www-authenticate"] == 'Bearer realm="ttaserve"'
    assert ALICE not in r.text


def test_a_classify_key_is_told_it_needs_an_admin_key(keyed_client):
    r = keyed_client.post("/v1/label-sets", json={"name": "x", "labels": ["a"]}, headers=bearer(CAROL))
    assert r.status_code == 403
    assert "admin key" in r.json()["error"]["message"] and "'carol'" in r.json()["error"]["message"]
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]


def test_one_key_cannot_see_or_touch_another_keys_label_sets(keyed_client):
    c = keyed_client
    body = {"name": "pets", "labels": ["cat", "dog"]}
    assert c.post("/v1/label-sets", json=body, headers=bearer(ALICE_ADMIN)).status_code == 201
    image = b64(png_bytes())

    # Bob: as if it did not exist.
    assert c.get("/v1/label-sets/pets", headers=bearer(BOB_ADMIN)).json()["error"]["code"] == "unknown_label_set"
    names = [s["name"] for s in c.get("/v1/label-sets", headers=bearer(BOB_ADMIN)).json()["label_sets"]]
    assert names == ["tiny-colours"]  # the model's own set is everyone's
    r = c.post("/v1/classify", json={"images": [image], "label_set": "pets"}, headers=bearer(BOB_ADMIN))
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_label_set"
    assert c.get("/v1/label-sets/pets/calibration", headers=bearer(BOB_ADMIN)).status_code == 404
    assert c.delete("/v1/label-sets/pets", headers=bearer(BOB_ADMIN)).status_code == 404
    assert c.delete("/v1/label-sets/pets/calibration", headers=bearer(BOB_ADMIN)).status_code == 404
    # ... and free to use the name for a set of its own.
    theirs = {"name": "pets", "labels": ["hamster", "parrot", "fish"]}
    assert c.post("/v1/label-sets", json=theirs, headers=bearer(BOB_ADMIN)).status_code == 201
    r = c.post("/v1/classify", json={"images": [image], "label_set": "pets"}, headers=bearer(BOB_ADMIN))
    assert {p["label"] for p in r.json()["results"][0]["predictions"]} == {"hamster", "parrot", "fish"}

    # Alice's classify key has her name: it sees and uses her set, not Bob's.
    assert c.get("/v1/label-sets/pets", headers=bearer(ALICE)).json()["labels"] == ["cat", "dog"]
    r = c.post("/v1/classify", json={"images": [image], "label_set": "pets"}, headers=bearer(ALICE))
    assert {p["label"] for p in r.json()["results"][0]["predictions"]} == {"cat", "dog"}
    # Carol, another name, sees neither.
    assert c.get("/v1/label-sets/pets", headers=bearer(CAROL)).status_code == 404
    # Each set has its own accuracy estimate.
    text = c.get("/metrics").text
    assert metric(text, 'tta_estimated_accuracy_images{label_set="alice/pets"}') == 1
    assert metric(text, 'tta_estimated_accuracy_images{label_set="bob/pets"}') == 1
    # Deleting Alice's leaves Bob's.
    assert c.delete("/v1/label-sets/pets", headers=bearer(ALICE_ADMIN)).status_code == 204
    assert c.get("/v1/label-sets/pets", headers=bearer(BOB_ADMIN)).json()["labels"] == theirs["labels"]
    text = c.get("/metrics").text
    assert 'label_set="alice/pets"' not in text and 'label_set="bob/pets"' in text


def test_a_calibration_of_the_shipped_label_set_is_its_keys_own(keyed_client):
    c = keyed_client
    images, labels = labelled(20)
    assert [*LABELS] == ["red", "green", "blue"]  # the tiny model's shipped set has these labels
    r = c.post(
        "/v1/label-sets/tiny-colours/calibration",
        json={"images": images, "labels": labels},
        headers=bearer(ALICE_ADMIN),
    )
    assert r.status_code == 202, r.text

    def state() -> str:
        fit = c.get("/v1/label-sets/tiny-colours/calibration", headers=bearer(ALICE_ADMIN)).json()["fit"]
        return str(fit["state"])

    wait_until(lambda: state() != "running", "the calibration to end")
    assert state() == "fitted"
    mine = c.get("/v1/label-sets/tiny-colours/calibration", headers=bearer(ALICE)).json()
    assert [x["method"] for x in mine["calibrations"]] == ["zero_shot"]
    theirs = c.get("/v1/label-sets/tiny-colours/calibration", headers=bearer(BOB_ADMIN)).json()
    assert theirs["calibrations"] == [] and theirs["fit"] is None
    probe = {"images": [b64(png_bytes(seed=5))], "label_set": "tiny-colours"}
    alice = c.post("/v1/classify", json=probe, headers=bearer(ALICE)).json()["results"][0]["predictions"][0]
    bob = c.post("/v1/classify", json=probe, headers=bearer(BOB_ADMIN)).json()["results"][0]["predictions"][0]
    assert alice["logit"] == pytest.approx(bob["logit"])  # the same answer, calibrated two ways
    assert alice["score"] != pytest.approx(bob["score"], abs=1e-6)


def test_metrics_ask_for_a_key_when_told_to(settings):
    with TestClient(create_app(keyed(settings, metrics_require_key=True))) as c:
        wait_ready(c)
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=bearer(CAROL)).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_logs_name_the_key_and_never_show_it(keyed_client, caplog):
    caplog.set_level(logging.INFO, logger="ttaserve")
    keyed_client.get("/v1/label-sets/nope", headers=bearer(BOB_ADMIN))
    keyed_client.post("/v1/label-sets", json={"name": "x", "labels": ["a"]}, headers=bearer(CAROL))
    access = [r.getMessage() for r in caplog.records if r.name == "ttaserve.access"]
    assert any(m.startswith("GET /v1/label-sets/nope 404") and m.endswith("key=bob") for m in access), access
    assert any(m.startswith("POST /v1/label-sets 403") and m.endswith("key=carol") for m in access), access
    errors = [r for r in caplog.records if r.name == "ttaserve.errors"]
    assert [getattr(r, "key_name", None) for r in errors] == ["bob", "carol"]
    everything = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert BOB_ADMIN not in everything and CAROL not in everything


def test_keys_from_a_file_with_names_and_comments(settings, tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(f"# team keys\n\ndave {'d' * 20}\nerin:{'e' * 20}\n")
    with TestClient(create_app(settings.model_copy(update={"api_keys": SecretStr(f"@{path}")}))) as c:
        wait_ready(c)
        assert c.get("/v1/label-sets", headers=bearer("d" * 20)).status_code == 200
        assert c.get("/v1/label-sets", headers=bearer("e" * 20)).status_code == 200
        assert c.get("/v1/label-sets", headers=bearer("dave")).status_code == 401
        # No admin key: nothing can change state.
        assert (
            c.post("/v1/label-sets", json={"name": "x", "labels": ["a"]}, headers=bearer("d" * 20)).status_code == 403
        )


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("alice:short", "at least 16"),
        (f"bad/name:{'k' * 20}", "a key's name"),
        (f"alice:{'k' * 20},bob:{'k' * 20}", "the same key is configured twice"),
        ("@/nonexistent/keys.txt", "cannot read the key file"),
    ],
)
def test_a_bad_key_setting_stops_start_up_naming_it_without_echoing_keys(settings, value, says):
    with pytest.raises(ConfigError, match="TTA_API_KEYS") as caught:
        create_app(settings.model_copy(update={"api_keys": SecretStr(value)}))
    assert says in str(caught.value) and "k" * 20 not in str(caught.value)


def test_without_keys_the_server_is_open_and_warns_when_others_can_reach_it(settings, caplog):
    caplog.set_level(logging.WARNING, logger="ttaserve")
    with TestClient(create_app(settings.model_copy(update={"host": "0.0.0.0"}))) as c:
        wait_ready(c)
        assert c.post("/v1/label-sets", json={"name": "open", "labels": ["a"]}).status_code == 201
    assert any("without API keys" in r.getMessage() and "0.0.0.0" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with TestClient(create_app(settings)) as c:  # loopback: nobody else can reach it, no warning
        wait_ready(c)
    assert not any("without API keys" in r.getMessage() for r in caplog.records)
