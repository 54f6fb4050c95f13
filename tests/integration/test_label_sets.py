"""Label sets: create, list, get, delete, validation, and durability across restarts."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.api import create_app
from server.clip.templates import TEMPLATE_SETS
from tests.support.apps import wait_ready
from tests.support.images import b64, png_bytes


def test_crud(client):
    body = {
        "name": "animals",
        "labels": ["cat", "dog"],
        "templates": ["a photo of a {}."],
        "descriptions": {"cat": ["small, furry, whiskers"]},
    }
    r = client.post("/v1/label-sets", json=body)
    assert r.status_code == 201
    created = r.json()
    assert created["labels"] == ["cat", "dog"] and created["source"] == "user"
    assert client.get("/v1/label-sets/animals").json() == created
    names = [s["name"] for s in client.get("/v1/label-sets").json()["label_sets"]]
    assert names == ["tiny-colours", "animals"]
    assert client.delete("/v1/label-sets/animals").status_code == 204
    assert client.get("/v1/label-sets/animals").status_code == 404
    assert client.delete("/v1/label-sets/animals").json()["error"]["code"] == "unknown_label_set"


def test_named_template_set_is_stored_expanded(client):
    r = client.post("/v1/label-sets", json={"name": "ens", "labels": ["a", "b"], "templates": "ensemble7"})
    assert r.json()["templates"] == list(TEMPLATE_SETS["ensemble7"])


def test_validation_and_conflicts(client):
    ok = {"name": "s1", "labels": ["a", "b"]}
    assert client.post("/v1/label-sets", json=ok).status_code == 201
    r = client.post("/v1/label-sets", json=ok)
    assert r.status_code == 409 and r.json()["error"]["code"] == "label_set_exists"
    r = client.post("/v1/label-sets", json={"name": "bad name!", "labels": ["a"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_name"
    r = client.post("/v1/label-sets", json={"name": "dups", "labels": ["a", "a"]})
    assert r.json()["error"]["code"] == "duplicate_labels"
    r = client.post("/v1/label-sets", json={"name": "empty", "labels": []})
    assert r.json()["error"]["code"] == "no_labels"
    r = client.post("/v1/label-sets", json={"name": "desc", "labels": ["a"], "descriptions": {"b": ["x"]}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_descriptions"
    r = client.post("/v1/label-sets", json={"name": "tiny-colours", "labels": ["a"]})
    assert r.status_code == 409
    r = client.delete("/v1/label-sets/tiny-colours")
    assert r.status_code == 409 and r.json()["error"]["code"] == "label_set_builtin"
    r = client.post("/v1/label-sets", json={"name": "x"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


def test_label_sets_survive_a_restart(settings):
    image = b64(png_bytes(seed=3))
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert (
            c.post(
                "/v1/label-sets", json={"name": "kept", "labels": ["x", "y", "z"], "templates": ["{} here"]}
            ).status_code
            == 201
        )
        assert c.post("/v1/label-sets", json={"name": "gone", "labels": ["x"]}).status_code == 201
        assert c.delete("/v1/label-sets/gone").status_code == 204
        before = c.post("/v1/classify", json={"images": [image], "label_set": "kept"}).json()["results"][0]
        before = before["predictions"]
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        kept = c.get("/v1/label-sets/kept").json()
        assert kept["labels"] == ["x", "y", "z"] and kept["templates"] == ["{} here"]
        assert c.get("/v1/label-sets/gone").status_code == 404
        after = c.post("/v1/classify", json={"images": [image], "label_set": "kept"}).json()["results"][0]
        after = after["predictions"]
        assert after == before
