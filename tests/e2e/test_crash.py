"""``kill -9`` while label sets are being written, then a restart on the same data directory: every label set
that was answered 201 is there, and the SQLite file is consistent."""

from __future__ import annotations

import signal
import sqlite3
import threading

import httpx

from tests.support.apps import PATIENCE_S, wait_until
from tests.support.servers import free_port, start, wait_served

WRITERS = 4


def test_label_sets_answered_201_survive_kill_9(tiny_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(["--model", f"local-dir:{tiny_model_dir}", "--port", str(port)], tmp_path)
    created: dict[str, list[str]] = {}  # answered 201
    unanswered: set[str] = set()  # sent, no answer: the kill came first (stored or not, either is right)
    lock = threading.Lock()

    def writer(w: int) -> None:
        with httpx.Client(timeout=PATIENCE_S) as client:
            for i in range(10_000):
                name, labels = f"set-{w}-{i}", [f"label {w} {i} {k}" for k in range(20)]
                try:
                    r = client.post(f"{url}/v1/label-sets", json={"name": name, "labels": labels})
                except httpx.HTTPError:
                    with lock:
                        unanswered.add(name)
                    return
                assert r.status_code == 201, r.text
                with lock:
                    created[name] = labels

    try:
        wait_served(url, proc)
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
        for t in threads:
            t.start()
        wait_until(lambda: len(created) >= 40, "40 label sets to be created")
        proc.send_signal(signal.SIGKILL)  # mid-way: the writers are still sending
        assert proc.wait(PATIENCE_S) == -signal.SIGKILL
        for t in threads:
            t.join(PATIENCE_S)
        assert len(unanswered) == WRITERS  # each writer had a request in flight when the process died
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(PATIENCE_S)

    db = tmp_path / "data" / "ttaserve.db"
    with sqlite3.connect(db) as conn:  # what SQLite itself says of the file the process left
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    proc = start(["--model", f"local-dir:{tiny_model_dir}", "--port", str(port)], tmp_path)
    try:
        wait_served(url, proc)
        stored = {
            s["name"]: s["labels"]
            for s in httpx.get(f"{url}/v1/label-sets", timeout=PATIENCE_S).json()["label_sets"]
            if s["source"] == "user"
        }
    finally:
        proc.terminate()
        proc.wait(PATIENCE_S)
    missing = sorted(set(created) - set(stored))
    assert not missing, f"{len(missing)} label sets answered 201 are gone after kill -9: {missing[:5]}"
    assert all(stored[name] == labels for name, labels in created.items())
    assert set(stored) - set(created) <= unanswered  # nothing stored that was never sent
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
