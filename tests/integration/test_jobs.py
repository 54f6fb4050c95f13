"""Few-shot training jobs over HTTP on the tiny model: a job trains in its own worker process, reports progress,
publishes an adapter that serves; cancelling, killing the worker and restarting the server leave the right state
and nothing half-written; bad requests are refused before anything is queued; keys never see each other's jobs."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from server.api import create_app
from server.settings import Settings
from server.storage import SqliteStore
from server.storage.base import JobRecord
from tests.integration.test_auth import ALICE, ALICE_ADMIN, BOB_ADMIN, bearer, keyed
from tests.support.apps import wait_for, wait_ready
from tests.support.images import b64, png_bytes
from tests.support.postgres import PostgresServer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
LONG = 10_000  # steps of a job that is stopped long before it ends


def support(per_label: int = 2) -> list[dict[str, str]]:
    return [
        {"image": b64(png_bytes(color=tuple(min(255, c + 7 * i) for c in rgb), size=(36 + i, 40))), "label": label}  # type: ignore[arg-type]
        for label, rgb in COLOURS.items()
        for i in range(per_label)
    ]


def add_label_set(client: TestClient, headers: dict[str, str] | None = None) -> None:
    made = client.post("/v1/label-sets", json={"name": "colours", "labels": list(COLOURS)}, headers=headers)
    assert made.status_code == 201, made.text


def submit(client: TestClient, headers: dict[str, str] | None = None, **body: Any) -> Any:
    payload = {"label_set": "colours", "support": support(), "name": "shades", "steps": 4, "batch_size": 6, **body}
    return client.post("/v1/jobs/finetune", json=payload, headers=headers)


def job(client: TestClient, job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    answer = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def ended(client: TestClient, job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The job once it has ended."""

    def probe() -> dict[str, Any] | None:
        current = job(client, job_id, headers)
        return current if current["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(probe, f"job {job_id} to end")


def training(client: TestClient, job_id: str) -> dict[str, Any]:
    """The job once its worker has reported a training step."""

    def probe() -> dict[str, Any] | None:
        current = job(client, job_id)
        assert current["state"] in ("queued", "running"), current
        return current if (current["step"] or 0) >= 1 else None

    return wait_for(probe, f"job {job_id} to report a training step")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def jobs_client(client: TestClient) -> TestClient:
    add_label_set(client)
    return client


def test_a_job_trains_in_a_worker_reports_progress_and_publishes_a_served_adapter(jobs_client: TestClient) -> None:
    client = jobs_client
    answer = submit(client, group="g1", anchors={"captions": [{"image": support()[0]["image"], "text": "a red card"}]})
    assert answer.status_code == 202, answer.text
    queued = answer.json()
    assert answer.headers["location"] == f"/v1/jobs/{queued['id']}"
    assert queued["state"] in ("queued", "running")
    assert queued["spec"]["labels"] == list(COLOURS) and queued["spec"]["config"]["steps"] == 4
    assert queued["spec"]["shots"] == {"red": 2, "green": 2, "blue": 2} and queued["spec"]["caption_anchors"] == 1
    assert "image" not in str(queued["spec"])  # the spec keeps no images

    done = ended(client, queued["id"])
    assert done["state"] == "succeeded", done
    assert done["result"]["adapter"] == "shades@v1"
    assert (done["step"], done["steps"], done["eta_s"]) == (4, 4, 0.0)
    assert math.isfinite(done["loss"]) and done["elapsed_s"] > 0 and done["pid"] is None
    assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == [queued["id"]]

    listed = client.get("/v1/adapters").json()["adapters"]
    assert [(a["ref"], a["source"], a["group"], a["labels"]) for a in listed] == [
        ("shades@v1", f"job:{queued['id']}", "g1", list(COLOURS))
    ]
    assert listed[0]["training"]["steps"] == 4 and listed[0]["training"]["caption_anchors"] == 1
    served = client.post(
        "/v1/classify",
        json={"images": [support()[0]["image"]], "label_set": "colours", "adapter": "shades@v1", "compare": True},
    )
    assert served.status_code == 200, served.text
    assert served.json()["results"][0]["adapter"]["adapter"] == "shades@v1"


def test_cancelling_a_running_job_stops_its_worker_and_publishes_nothing(jobs_client: TestClient) -> None:
    client = jobs_client
    job_id = submit(client, steps=LONG).json()["id"]
    running = training(client, job_id)
    assert running["state"] == "running" and running["steps"] == LONG and running["stage"] == "training"
    assert running["elapsed_s"] > 0 and running["eta_s"] > 0 and running["pid"] > 0

    cancelled = client.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled" and cancelled.json()["result"] is None
    assert not alive(running["pid"])
    assert client.get("/v1/adapters").json()["adapters"] == []
    again = client.delete(f"/v1/jobs/{job_id}")
    assert (again.status_code, again.json()["error"]["code"]) == (409, "job_finished")


def test_a_killed_worker_fails_its_job_and_the_server_goes_on(jobs_client: TestClient) -> None:
    client = jobs_client
    job_id = submit(client, steps=LONG).json()["id"]
    pid = training(client, job_id)["pid"]
    os.kill(pid, signal.SIGKILL)
    failed = ended(client, job_id)
    assert failed["state"] == "failed" and "SIGKILL" in failed["error"], failed
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/adapters").json()["adapters"] == []
    # The next job runs as usual.
    assert ended(client, submit(client).json()["id"])["state"] == "succeeded"


def test_a_queued_job_cancelled_never_starts(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"job_workers": 1}))) as client:
        wait_ready(client)
        add_label_set(client)
        first = submit(client, steps=LONG).json()["id"]
        training(client, first)
        second = submit(client).json()["id"]
        assert job(client, second)["state"] == "queued"  # one worker at a time: the first holds it
        assert client.delete(f"/v1/jobs/{second}").json()["state"] == "cancelled"
        assert client.delete(f"/v1/jobs/{first}").json()["state"] == "cancelled"
        assert job(client, second)["step"] is None and client.get("/v1/adapters").json()["adapters"] == []


def test_a_restart_fails_what_was_running_and_runs_what_was_queued(settings: Settings, tmp_path: Path) -> None:
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        add_label_set(client)
        interrupted = submit(client, steps=LONG).json()["id"]
        pid = training(client, interrupted)["pid"]
        waiting = submit(client, name="later").json()["id"]
        assert job(client, waiting)["state"] == "queued"
    # Closing the server stopped its worker and failed its job; the queued one is still queued.
    assert not alive(pid)
    store = SqliteStore(settings.data_dir / "ttaserve.db")
    assert store.job(interrupted, owner=None).state == "failed"
    assert "interrupted" in (store.job(interrupted, owner=None).error or "")
    assert store.job(waiting, owner=None).state == "queued"
    assert store.job_inputs(interrupted) == b"" and store.job_inputs(waiting) != b""  # images kept while needed
    # A server that died while a job ran (no close) left it running: the next one fails it.
    crashed = JobRecord(id="crashed", kind="finetune", state="running", spec={}, owner="")
    store.create_job(crashed, b"{}")
    store.close()

    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        lost = job(client, "crashed")
        assert lost["state"] == "failed" and lost["error"] == "interrupted by a server restart; submit it again"
        assert ended(client, waiting)["state"] == "succeeded"
        assert [a["ref"] for a in client.get("/v1/adapters").json()["adapters"]] == ["later@v1"]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"support": [*support(), {"image": support()[0]["image"], "label": "purple"}]}, "unknown_label"),
        ({"support": [s for s in support() if s["label"] != "blue"]}, "too_few_images"),
        ({"support": []}, "too_few_images"),
        ({"steps": 0}, "invalid_train_config"),
        ({"lr": -1.0}, "invalid_train_config"),
        ({"steps": 10_001}, "invalid_train_config"),  # over TTA_MAX_TRAIN_STEPS
        ({"type": "full"}, "validation_error"),
        ({"epochs": 3}, "validation_error"),
        ({"name": "no spaces"}, "invalid_name"),
        ({"support": [{"image": "not base64!", "label": "red"}, *support()]}, "invalid_base64"),
        ({"support": [{"image": b64(b"not an image"), "label": "red"}, *support()]}, "invalid_image"),
        ({"anchors": {"captions": [{"image": support()[0]["image"], "text": "  "}]}}, "invalid_anchor"),
    ],
)
def test_a_bad_request_is_refused_before_anything_is_queued(
    jobs_client: TestClient, change: dict[str, Any], code: str
) -> None:
    answer = submit(jobs_client, **change)
    assert (answer.status_code, answer.json()["error"]["code"]) == (422, code), answer.text
    assert jobs_client.get("/v1/jobs").json()["jobs"] == []


def test_unknown_label_set_and_too_many_images(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_train_images": 5}))) as client:
        wait_ready(client)
        assert submit(client).json()["error"]["code"] == "unknown_label_set"
        add_label_set(client)
        answer = submit(client)
        assert (answer.status_code, answer.json()["error"]["code"]) == (422, "too_many_images")


def test_another_key_cannot_see_or_cancel_a_job(settings: Settings) -> None:
    with TestClient(create_app(keyed(settings))) as client:
        wait_ready(client)
        alice, bob = bearer(ALICE_ADMIN), bearer(BOB_ADMIN)
        add_label_set(client, alice)
        assert submit(client, bearer(ALICE)).status_code == 403  # training changes state: an admin key
        job_id = submit(client, alice, steps=LONG).json()["id"]
        assert client.get(f"/v1/jobs/{job_id}", headers=bob).status_code == 404
        assert client.delete(f"/v1/jobs/{job_id}", headers=bob).status_code == 404
        assert client.get("/v1/jobs", headers=bob).json()["jobs"] == []
        assert job(client, job_id, bearer(ALICE))["id"] == job_id  # the same key name: the same tenant
        assert client.delete(f"/v1/jobs/{job_id}", headers=alice).json()["state"] == "cancelled"


def test_workers_share_a_postgresql_store_with_the_server(settings: Settings, postgres_server: PostgresServer) -> None:
    shared = settings.model_copy(update={"database_url": SecretStr(postgres_server.new_database())})
    with TestClient(create_app(shared)) as client:
        wait_ready(client)
        add_label_set(client)
        killed = submit(client, steps=LONG).json()["id"]
        os.kill(training(client, killed)["pid"], signal.SIGKILL)
        assert "SIGKILL" in ended(client, killed)["error"]
        done = ended(client, submit(client).json()["id"])
        assert done["state"] == "succeeded" and done["result"]["adapter"] == "shades@v1"
        assert [a["ref"] for a in client.get("/v1/adapters").json()["adapters"]] == ["shades@v1"]
