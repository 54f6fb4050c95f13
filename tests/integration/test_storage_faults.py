"""A data directory whose disk is full or read-only: writes get a clear 507 or 503, classification keeps serving.

The store is the real SQLite store, opened through the app factory's ``store`` parameter with a limit
SQLite itself enforces: ``max_page_count`` (the file may not grow: SQLITE_FULL, as on a full disk) or
``query_only`` (SQLITE_READONLY, as on a read-only mount). Tests may run as root, where chmod stops
nothing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from server.api import create_app
from server.settings import Settings
from server.storage import DATABASE_FILE, SqliteStore
from tests.support.apps import wait_ready
from tests.support.images import b64, png_bytes

CLASSIFY = {"images": [b64(png_bytes())], "labels": ["red", "green", "blue"]}


def store_with(pragma: str):
    def open_store(settings: Settings) -> SqliteStore:
        store = SqliteStore(Path(settings.data_dir) / DATABASE_FILE)
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(pragma.format(pages=pages))
        return store

    return open_store


def big_labels(n: int = 400) -> list[str]:
    return [f"label {i} " + "x" * 150 for i in range(n)]  # about 64 KB: needs pages the file does not have


def test_a_full_disk_answers_507_on_writes_while_classify_and_deletes_go_on(settings):
    full = store_with("PRAGMA max_page_count = {pages}")
    with TestClient(create_app(settings, store=full), raise_server_exceptions=False) as c:
        wait_ready(c)
        # A small set fits in the pages the file already has; a large one needs more.
        assert c.post("/v1/label-sets", json={"name": "small", "labels": ["red", "blue"]}).status_code == 201
        r = c.post("/v1/label-sets", json={"name": "big", "labels": big_labels()}, headers={"X-Request-ID": "w-1"})
        assert r.status_code == 507, r.text
        assert r.json()["error"] == {
            "code": "storage_full",
            "message": r.json()["error"]["message"],
            "request_id": "w-1",
        }
        assert "TTA_DATA_DIR" in r.json()["error"]["message"]
        assert c.post("/v1/classify", json=CLASSIFY).status_code == 200
        assert c.post("/v1/classify", json={"images": CLASSIFY["images"], "label_set": "small"}).status_code == 200
        # The failed write left nothing half done: the store still reads and deletes.
        assert [s["name"] for s in c.get("/v1/label-sets").json()["label_sets"] if s["source"] == "user"] == ["small"]
        assert c.delete("/v1/label-sets/small").status_code == 204
        assert c.get("/v1/label-sets/small").status_code == 404


def test_a_read_only_data_dir_answers_503_on_writes_while_reads_and_classify_go_on(settings):
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        assert c.post("/v1/label-sets", json={"name": "kept", "labels": ["red", "blue"]}).status_code == 201
    locked = store_with("PRAGMA query_only = ON")
    with TestClient(create_app(settings, store=locked), raise_server_exceptions=False) as c:
        wait_ready(c)
        for r in (
            c.post("/v1/label-sets", json={"name": "new", "labels": ["a", "b"]}),
            c.delete("/v1/label-sets/kept"),
        ):
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "storage_read_only"
        assert c.get("/v1/label-sets/kept").json()["labels"] == ["red", "blue"]
        assert c.post("/v1/classify", json={"images": CLASSIFY["images"], "label_set": "kept"}).status_code == 200
