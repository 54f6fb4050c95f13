"""Two ``python -m server`` processes on one PostgreSQL database (TTA_DATABASE_URL), as replicas behind a Service:
what is stored through one is served by the other at once, per API key, and the URL's password is never logged.

Replica A is told the URL by the environment, replica B by ``--database-url``. Every request goes to a
chosen replica, so each assertion says which one stored and which one served.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support.apps import PATIENCE_S, metric, wait_until
from tests.support.images import b64, png_bytes
from tests.support.postgres import PASSWORD, PostgresServer
from tests.support.servers import running

ALICE = "alice-admin-0123456789abcdef"
BOB = "bob-admin-0123456789abcdef"
KEYS = {"TTA_ADMIN_API_KEYS": f"alice:{ALICE},bob:{BOB}"}
PROBE = b64(png_bytes(seed=123))
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


@dataclass
class Replica:
    url: str
    process: subprocess.Popen[str]

    def as_(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=PATIENCE_S)


@pytest.fixture(scope="module")
def replicas(
    tiny_model_dir: Path, postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Replica, Replica]]:
    database = postgres_server.new_database()
    with ExitStack() as stack:
        a = stack.enter_context(
            running(tiny_model_dir, tmp_path_factory.mktemp("a"), env={**KEYS, "TTA_DATABASE_URL": database})
        )
        b = stack.enter_context(
            running(tiny_model_dir, tmp_path_factory.mktemp("b"), "--database-url", database, env=KEYS)
        )
        yield Replica(*a), Replica(*b)


def labels_answered(client: httpx.Client, label_set: str, top_k: int) -> set[str]:
    r = client.post("/v1/classify", json={"images": [PROBE], "label_set": label_set, "top_k": top_k})
    assert r.status_code == 200, r.text
    return {p["label"] for p in r.json()["results"][0]["predictions"]}


def score(client: httpx.Client, label_set: str) -> float:
    r = client.post("/v1/classify", json={"images": [PROBE], "label_set": label_set})
    assert r.status_code == 200, r.text
    return float(r.json()["results"][0]["predictions"][0]["score"])


def patches(n: int) -> tuple[list[str], list[str]]:
    """``n`` images of plain colour patches, varied in size, and their labels."""
    images, labels = [], []
    for i in range(n):
        label = list(COLOURS)[i % 3]
        buffer = io.BytesIO()
        Image.new("RGB", (20 + i, 24), COLOURS[label]).save(buffer, format="PNG")
        images.append(b64(buffer.getvalue()))
        labels.append(label)
    return images, labels


def test_a_label_set_stored_through_one_replica_is_served_by_the_other_and_never_stale(replicas):
    a, b = replicas
    with a.as_(ALICE) as on_a, b.as_(ALICE) as on_b:
        assert on_a.post("/v1/label-sets", json={"name": "pets", "labels": ["cat", "dog"]}).status_code == 201
        assert on_b.get("/v1/label-sets/pets").json()["labels"] == ["cat", "dog"]
        assert labels_answered(on_b, "pets", 2) == {"cat", "dog"}  # B built and cached its text features

        assert on_a.delete("/v1/label-sets/pets").status_code == 204
        for r in (
            on_b.get("/v1/label-sets/pets"),
            on_b.post("/v1/classify", json={"images": [PROBE], "label_set": "pets"}),
        ):
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_label_set", r.text
        assert "pets" not in [s["name"] for s in on_b.get("/v1/label-sets").json()["label_sets"]]

        # Created again under the name, with other labels: B answers with them, not what it cached before.
        again = {"name": "pets", "labels": ["red", "green", "blue"], "templates": ["a drawing of a {}."]}
        assert on_a.post("/v1/label-sets", json=again).status_code == 201
        assert on_b.get("/v1/label-sets/pets").json()["templates"] == ["a drawing of a {}."]
        assert labels_answered(on_b, "pets", 3) == {"red", "green", "blue"}
        # B's accuracy estimate of "pets" starts again with the new set, not mixed with the old one's answers.
        assert metric(on_b.get("/metrics").text, 'tta_estimated_accuracy_images{label_set="alice/pets"}') == 1
        # ...and B's write is A's read the other way round.
        assert on_b.delete("/v1/label-sets/pets").status_code == 204
        assert on_a.get("/v1/label-sets/pets").status_code == 404


def test_each_key_sees_only_its_own_label_sets_on_every_replica(replicas):
    a, b = replicas
    with a.as_(ALICE) as alice_a, b.as_(ALICE) as alice_b, a.as_(BOB) as bob_a, b.as_(BOB) as bob_b:
        assert alice_a.post("/v1/label-sets", json={"name": "mine", "labels": ["cat", "dog"]}).status_code == 201
        assert bob_b.get("/v1/label-sets/mine").status_code == 404
        assert "mine" not in [s["name"] for s in bob_b.get("/v1/label-sets").json()["label_sets"]]
        r = bob_b.post("/v1/classify", json={"images": [PROBE], "label_set": "mine"})
        assert r.status_code == 404, r.text
        assert bob_b.delete("/v1/label-sets/mine").status_code == 404  # not Bob's to delete

        assert bob_b.post("/v1/label-sets", json={"name": "mine", "labels": ["ant", "bee"]}).status_code == 201
        assert alice_b.get("/v1/label-sets/mine").json()["labels"] == ["cat", "dog"]
        assert bob_a.get("/v1/label-sets/mine").json()["labels"] == ["ant", "bee"]
        assert labels_answered(bob_a, "mine", 2) == {"ant", "bee"}
        assert labels_answered(alice_a, "mine", 2) == {"cat", "dog"}

        assert alice_b.delete("/v1/label-sets/mine").status_code == 204
        assert bob_a.get("/v1/label-sets/mine").json()["labels"] == ["ant", "bee"]
        assert bob_a.delete("/v1/label-sets/mine").status_code == 204


def test_a_calibration_fitted_through_one_replica_applies_on_the_other_until_dropped(replicas):
    a, b = replicas
    images, labels = patches(20)
    with a.as_(ALICE) as on_a, b.as_(ALICE) as on_b:
        assert on_a.post("/v1/label-sets", json={"name": "colours", "labels": list(COLOURS)}).status_code == 201
        default = score(on_b, "colours")
        r = on_a.post("/v1/label-sets/colours/calibration", json={"images": images, "labels": labels})
        assert r.status_code == 202, r.text
        wait_until(
            lambda: on_a.get("/v1/label-sets/colours/calibration").json()["fit"]["state"] != "running",
            "the calibration on A to end",
        )
        assert on_a.get("/v1/label-sets/colours/calibration").json()["fit"]["state"] == "fitted"

        seen_by_b = on_b.get("/v1/label-sets/colours/calibration").json()
        assert seen_by_b["fit"] is None  # the fit ran on A...
        assert [(c["method"], c["applies"]) for c in seen_by_b["calibrations"]] == [
            ("zero_shot", True)
        ]  # ...kept for all
        calibrated = score(on_a, "colours")
        assert calibrated != pytest.approx(default, abs=1e-6)
        assert score(on_b, "colours") == pytest.approx(calibrated, abs=1e-6)

        assert on_a.delete("/v1/label-sets/colours/calibration").status_code == 204
        assert on_b.get("/v1/label-sets/colours/calibration").json()["calibrations"] == []
        assert score(on_b, "colours") == pytest.approx(default, abs=1e-6)
        assert on_b.delete("/v1/label-sets/colours").status_code == 204


def output_so_far(process: subprocess.Popen[str]) -> str:
    """What a running process has written to its captured output, without waiting for more."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(fd, True)
    return b"".join(chunks).decode(errors="replace")


def test_the_database_password_is_never_logged(replicas):
    for replica in replicas:
        log = output_so_far(replica.process)
        assert "effective configuration" in log
        assert '"database_url": "postgresql://tta_test:***@127.0.0.1:' in log
        assert PASSWORD not in log
