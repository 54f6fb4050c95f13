"""Online sessions through HTTP: what one session keeps, that no other session or key sees it, that it
expires (on a clock the test moves), resets, stays within its byte caps, and applies its requests in order."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapters.online import TDA
from server.api import create_app
from server.settings import Settings
from tests.integration.test_auth import ALICE, BOB_ADMIN, CAROL, bearer, keyed
from tests.support.apps import metric, wait_ready, wait_until
from tests.support.gates import gated_loader
from tests.support.images import b64, png_bytes

LABELS = ["red", "green", "blue", "a cat", "a dog"]
OTHER = ["a square", "a circle", "a star"]
EMBED_DIM = 32  # the tiny model's (tests/support/model.py)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def images(n: int, start: int = 0) -> list[str]:
    return [b64(png_bytes(seed=start + i, size=(40 + i % 7, 36))) for i in range(n)]


def classify(client: TestClient, session: str | None, n: int = 4, start: int = 0, **extra: Any) -> Any:
    headers = extra.pop("headers", None)
    body: dict[str, Any] = {"images": images(n, start), "labels": LABELS, "top_k": len(LABELS), **extra}
    if session is not None:
        body["session"] = session
    return client.post("/v1/classify", json=body, headers=headers)


def sessions_of(client: TestClient) -> float:
    return metric(client.get("/metrics").text, "tta_sessions")


def with_clock(settings: Settings, **more: Any) -> Iterator[tuple[TestClient, Clock]]:
    with TestClient(create_app(settings.model_copy(update=more)), raise_server_exceptions=False) as client:
        wait_ready(client)
        clock = Clock()
        client.app.state.runtime.sessions.clock = clock  # type: ignore[attr-defined]
        yield client, clock


@pytest.fixture
def clocked(settings: Settings) -> Iterator[tuple[TestClient, Clock]]:
    yield from with_clock(settings)


@pytest.mark.parametrize("method", ["tda", "stats"])
def test_a_session_keeps_state_and_reports_it(client, method):
    first = classify(client, "cam-1", session_method=method, compare=True)
    assert first.status_code == 200, first.text
    reports = [r["session"] for r in first.json()["results"]]
    assert [r["id"] for r in reports] == ["cam-1"] * 4
    assert {r["session_method"] for r in reports} == {method}
    assert all(r["requests"] == 1 and r["reset"] is None for r in reports)
    assert reports[-1]["entries"] >= reports[0]["entries"] >= 1  # image by image, in order
    second = classify(client, "cam-1", start=10, session_method=method).json()["results"]
    assert second[0]["session"]["requests"] == 2
    assert second[-1]["session"]["entries"] >= reports[-1]["entries"]

    got = client.get("/v1/sessions/cam-1")
    assert got.status_code == 200
    body = got.json()
    assert body["requests"] == 2 and body["max_bytes"] == client.app.state.settings.session_max_bytes
    (state,) = body["states"]
    assert state["session_method"] == method and state["images"] == 8 and state["labels"] == len(LABELS)
    assert 0 < state["bytes"] <= state["max_bytes"] and body["bytes"] == state["bytes"]
    assert set(state["entries_per_class"]) <= set(LABELS) and sum(state["entries_per_class"].values()) > 0
    assert body["expires_at"] == body["last_used"] + client.app.state.settings.session_ttl_s


def test_nothing_is_kept_without_a_session_id(client):
    assert classify(client, None).json()["results"][0]["session"] is None
    assert sessions_of(client) == 0
    classify(client, "kept")
    assert sessions_of(client) == 1


def test_two_sessions_never_share_entries(client):
    a1 = classify(client, "a").json()["results"]
    before = client.get("/v1/sessions/a").json()
    assert client.get("/v1/sessions/b").status_code == 404  # b was never used
    b1 = classify(client, "b").json()["results"]
    # b starts empty: the same images give b what they gave a when a was new.
    assert [r["session"]["entries"] for r in b1] == [r["session"]["entries"] for r in a1]
    assert [r["predictions"] for r in b1] == [r["predictions"] for r in a1]
    for _ in range(2):
        classify(client, "b", start=20)
    after = client.get("/v1/sessions/a").json()
    assert after["states"][0]["images"] == before["states"][0]["images"] == 4
    assert after["states"][0]["entries_per_class"] == before["states"][0]["entries_per_class"]
    assert client.get("/v1/sessions/b").json()["states"][0]["images"] == 12


def test_each_label_set_has_its_own_state_and_a_changed_one_starts_afresh(client, tiny_model_dir):
    classify(client, "s")
    other = client.post("/v1/classify", json={"images": images(2), "labels": OTHER, "session": "s"}).json()
    assert other["results"][0]["session"]["requests"] == 1  # a new state for the other labels
    assert len(client.get("/v1/sessions/s").json()["states"]) == 2

    assert client.post("/v1/label-sets", json={"name": "mine", "labels": OTHER}).status_code == 201
    named = {"images": images(2), "label_set": "mine", "session": "s"}
    assert client.post("/v1/classify", json=named).json()["results"][0]["session"]["requests"] == 1
    assert client.post("/v1/classify", json=named).json()["results"][0]["session"]["requests"] == 2
    assert client.delete("/v1/label-sets/mine").status_code == 204
    assert client.post("/v1/label-sets", json={"name": "mine", "labels": LABELS}).status_code == 201
    changed = client.post("/v1/classify", json=named).json()["results"][0]["session"]
    assert changed["reset"] == "labels_changed" and changed["requests"] == 1
    switched = client.post("/v1/classify", json={**named, "session_method": "stats"}).json()["results"][0]
    assert switched["session"]["reset"] == "method_changed"


def test_a_session_expires_after_its_ttl(clocked):
    client, clock = clocked
    ttl = client.app.state.settings.session_ttl_s
    classify(client, "t")
    clock.now += ttl - 1
    assert client.get("/v1/sessions/t").status_code == 200
    classify(client, "t")  # using it renews it
    clock.now += ttl - 1
    assert client.get("/v1/sessions/t").json()["requests"] == 2
    clock.now += 1
    gone = client.get("/v1/sessions/t")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "session_not_found"
    assert classify(client, "t").json()["results"][0]["session"]["requests"] == 1
    assert metric(client.get("/metrics").text, 'tta_session_evictions_total{reason="ttl"}') == 1


def test_reset(client):
    classify(client, "r")
    assert client.delete("/v1/sessions/r").status_code == 204
    assert client.get("/v1/sessions/r").status_code == 404
    again = client.delete("/v1/sessions/r")
    assert again.status_code == 404 and again.json()["error"]["code"] == "session_not_found"
    assert classify(client, "r").json()["results"][0]["session"]["requests"] == 1


def test_caps_evict_the_least_recently_used(settings):
    one = TDA.capacity_bytes(len(LABELS), EMBED_DIM)  # the most one tda state of 5 labels can hold
    # One state of 5 labels fits a session; ten (each of at least 3 cached features) do not, nor ten sessions.
    gen = with_clock(settings, session_max_bytes=one, sessions_max_bytes=one, session_method="tda")
    client, clock = next(gen)
    assert client.get("/v1/models").json()["models"][0]["embed_dim"] == EMBED_DIM
    sets = [[f"s{j} {c}" for c in "abcde"] for j in range(10)]
    for labels in sets:
        clock.now += 1
        answer = client.post("/v1/classify", json={"images": images(16), "labels": labels, "session": "x"})
        assert answer.status_code == 200, answer.text
        assert client.get("/v1/sessions/x").json()["bytes"] <= one
    kept = [set(s["entries_per_class"]) for s in client.get("/v1/sessions/x").json()["states"]]
    assert 1 <= len(kept) < len(sets)
    assert all(k <= set(labels) for k, labels in zip(kept, reversed(sets), strict=False))  # the newest are kept
    text = client.get("/metrics").text
    assert metric(text, 'tta_session_evictions_total{reason="session_bytes"}') == len(sets) - len(kept)

    for k in range(10):
        clock.now += 1
        classify(client, f"t{k}", n=16)
        assert metric(client.get("/metrics").text, "tta_session_bytes") <= one
    assert metric(client.get("/metrics").text, "tta_sessions") < 10  # the least recently used were unloaded...
    assert client.get("/v1/sessions/t0").json()["requests"] == 1  # ...and are read back from the store
    assert client.get("/v1/sessions/t9").status_code == 200
    assert metric(client.get("/metrics").text, 'tta_session_evictions_total{reason="total_bytes"}') >= 1

    labels = [f"c{i}" for i in range(12)]
    too_many = client.post("/v1/classify", json={"images": images(1), "labels": labels, "session": "w"})
    assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "session_too_large"
    assert client.get("/v1/sessions/w").status_code == 404  # a refused request keeps nothing
    gen.close()


def test_keys_never_share_sessions(settings):
    with TestClient(create_app(keyed(settings)), raise_server_exceptions=False) as client:
        wait_ready(client)
        alice, carol = bearer(ALICE), bearer(CAROL)
        classify(client, "shared-id", headers=alice)
        assert client.get("/v1/sessions/shared-id", headers=carol).status_code == 404
        first = classify(client, "shared-id", headers=carol).json()["results"][0]["session"]
        assert first["requests"] == 1  # carol's own session, not alice's
        assert client.get("/v1/sessions/shared-id", headers=alice).json()["requests"] == 1
        # A classify key resets its own session; it never touches another key's of the same id.
        assert client.delete("/v1/sessions/shared-id", headers=carol).status_code == 204
        assert client.get("/v1/sessions/shared-id", headers=alice).status_code == 200
        assert client.delete("/v1/sessions/shared-id", headers=bearer(BOB_ADMIN)).status_code == 404
        assert client.get("/v1/sessions/shared-id").status_code == 401


def test_concurrent_requests_of_one_session_apply_in_order(settings):
    gate, entered = threading.Event(), threading.Event()
    app = create_app(settings, load=gated_loader(gate, entered))
    with TestClient(app, raise_server_exceptions=False) as client:
        gate.set()
        wait_ready(client)
        gate.clear()
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(classify, client, "q", 2)
            assert entered.wait(60), "the first request never reached the encoder"
            rest = [pool.submit(classify, client, "q", 2, 10 * (k + 1)) for k in range(5)]
            # The five wait for the session, not in the engine's queue: none reaches the engine before the first
            # one's update is done.
            wait_until(lambda: client.get("/v1/sessions/q").json()["waiting"] == 5, "five requests waiting")
            assert metric(client.get("/metrics").text, "tta_queue_depth") == 0
            gate.set()
            answers = [first.result(), *(f.result() for f in rest)]
        assert all(a.status_code == 200 for a in answers)
        counts = [a.json()["results"][0]["session"]["requests"] for a in answers]
        assert counts[0] == 1  # the first held the session; every other request saw it finished
        assert sorted(counts) == [1, 2, 3, 4, 5, 6]  # one at a time: no two requests saw the same state
        entries = {c: a.json()["results"][-1]["session"]["entries"] for c, a in zip(counts, answers, strict=True)}
        assert [entries[c] for c in sorted(entries)] == sorted(entries.values())
        assert client.get("/v1/sessions/q").json()["states"][0]["images"] == 12


def test_bad_session_requests_are_refused(client):
    def code(**body: Any) -> tuple[int, str]:
        r = client.post("/v1/classify", json={"images": images(1), "labels": LABELS, **body})
        return r.status_code, r.json()["error"]["code"] if r.status_code != 200 else ""

    assert code(session="s", method="tpt") == (422, "session_method_unsupported")
    assert code(session="s", session_method="nope") == (422, "unknown_session_method")
    assert code(session_method="tda") == (422, "session_method_without_session")
    assert code(session="-bad") == (422, "validation_error")
    assert code(session="x" * 65) == (422, "validation_error")
    assert client.get("/v1/sessions/never").json()["error"]["code"] == "session_not_found"
    methods = client.get("/v1/methods").json()["sessions"]
    assert methods["combines_with"] == ["zero_shot"] and {m["name"] for m in methods["methods"]} == {"tda", "stats"}


def test_a_session_survives_a_restart_and_a_reset_one_does_not(settings):
    """After a restart a session goes on exactly where it was: its third request answers as an uninterrupted
    session's third request does."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        for start in (0, 10):
            assert classify(client, "cam", start=start).status_code == 200
        before = client.get("/v1/sessions/cam").json()
        classify(client, "reset-me")
        assert client.delete("/v1/sessions/reset-me").status_code == 204
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        after = client.get("/v1/sessions/cam").json()
        assert {k: after[k] for k in ("requests", "bytes", "states")} == {
            k: before[k] for k in ("requests", "bytes", "states")
        }
        third = classify(client, "cam", start=20).json()["results"]
        for start in (0, 10):
            classify(client, "uninterrupted", start=start)
        reference = classify(client, "uninterrupted", start=20).json()["results"]
        assert [r["session"]["requests"] for r in third] == [3] * 4
        assert [r["predictions"] for r in third] == [r["predictions"] for r in reference]
        assert [r["session"]["entries"] for r in third] == [r["session"]["entries"] for r in reference]
        assert client.get("/v1/sessions/reset-me").status_code == 404
