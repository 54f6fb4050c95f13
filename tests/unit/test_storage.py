"""The stores: the Store protocol's contract, run against SQLite and a real PostgreSQL; SQLite's schema version
and migrations from older files (PostgreSQL's are in tests/integration/test_postgres.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator

import pytest

from server.errors import ConfigError, Conflict, NotFound
from server.storage import CalibrationRecord, LabelSet, PostgresStore, SqliteStore, Store
from server.storage.base import AdapterRecord, JobRecord
from server.storage.sqlite import SCHEMA_VERSION

Opener = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Opener]:
    """Opens a store on one location (a file, a database), as often as a test likes: each opening is a new
    process's view of it. Every store opened is closed after the test."""
    opened: list[Store] = []
    if request.param == "sqlite":
        where = tmp_path / "ttaserve.db"

        def opener() -> Store:
            opened.append(SqliteStore(where))
            return opened[-1]
    else:
        url = request.getfixturevalue("postgres_server").new_database()

        def opener() -> Store:
            opened.append(PostgresStore(url))
            return opened[-1]

    yield opener
    for store in opened:
        store.close()


def calibration(label_set: str, method: str, owner: str = "", created_at: float = 1.0) -> CalibrationRecord:
    return CalibrationRecord(
        label_set, method, f"ls-{label_set}", "model-1", {"temperature": 1.5}, {"images": 20}, created_at, owner=owner
    )


def test_a_label_set_reads_back_as_written_from_another_opening(open_store):
    written = LabelSet(
        "pets",
        ("cat", "dog", "Zebra finch", "émeu"),
        ("a photo of a {}.", "a {}."),
        {"dog": ["barks", "has a tail"], "cat": ["has whiskers"]},  # not in label order: kept as written
        created_at=1764331234.123456789,
        owner="alice",
    )
    open_store().create_label_set(written)
    read = open_store().get_label_set("pets", owner="alice")
    assert read == written
    assert list(read.descriptions or {}) == ["dog", "cat"]


def test_names_are_unique_per_owner_and_listed_in_order(open_store):
    store = open_store()
    for name in ("b", "B", "a", "a-1"):
        store.create_label_set(LabelSet(name, ("x",)))
    with pytest.raises(Conflict) as taken:
        store.create_label_set(LabelSet("a", ("y",)))
    assert taken.value.code == "label_set_exists"
    assert store.get_label_set("a").labels == ("x",)  # the refused write changed nothing
    assert [s.name for s in store.list_label_sets()] == ["B", "a", "a-1", "b"]  # byte order, as SQLite sorts
    assert store.get_label_set("b").templates is None and store.get_label_set("b").descriptions is None


def test_each_owner_sees_its_own_label_sets_only(open_store):
    store = open_store()
    store.create_label_set(LabelSet("pets", ("cat",), owner="alice"))
    store.create_label_set(LabelSet("pets", ("hamster",), owner="bob"))
    assert store.get_label_set("pets", owner="alice").labels == ("cat",)
    assert store.get_label_set("pets", owner="bob").labels == ("hamster",)
    with pytest.raises(NotFound) as missing:
        store.get_label_set("pets")  # no key: another owner
    assert missing.value.code == "unknown_label_set"
    assert [s.owner for s in store.list_label_sets("alice")] == ["alice"]
    assert store.list_label_sets("carol") == []
    store.delete_label_set("pets", owner="bob")
    assert store.get_label_set("pets", owner="alice").labels == ("cat",)
    with pytest.raises(NotFound):
        store.delete_label_set("pets", owner="bob")


def test_calibrations_are_replaced_per_method_and_go_with_their_label_set(open_store):
    store = open_store()
    store.create_label_set(LabelSet("pets", ("cat", "dog"), owner="alice"))
    store.create_label_set(LabelSet("pets", ("cat", "dog"), owner="bob"))
    store.save_calibration(calibration("pets", "zero_shot", "alice", created_at=1.0))
    store.save_calibration(calibration("pets", "tpt", "alice"))
    store.save_calibration(calibration("pets", "zero_shot", "bob"))
    replaced = CalibrationRecord("pets", "zero_shot", "ls-2", "model-2", {"t": 2.0}, {"images": 40}, 2.5, "alice")
    store.save_calibration(replaced)

    again = open_store()
    assert again.calibrations("pets", owner="alice") == [calibration("pets", "tpt", "alice"), replaced]
    assert [(r.owner, r.method) for r in again.calibrations()] == [
        ("alice", "tpt"),
        ("alice", "zero_shot"),
        ("bob", "zero_shot"),
    ]
    again.delete_calibrations("pets", owner="alice")
    assert again.calibrations("pets", owner="alice") == []
    assert len(again.calibrations("pets", owner="bob")) == 1
    again.save_calibration(calibration("pets", "tpt", "alice"))
    again.delete_label_set("pets", owner="alice")  # takes its calibrations with it, not bob's
    assert [(r.owner, r.method) for r in open_store().calibrations()] == [("bob", "zero_shot")]


# The table as the store created it before the database had a schema version (user_version 0).
UNVERSIONED = """
CREATE TABLE IF NOT EXISTS label_sets (
    name TEXT PRIMARY KEY, labels TEXT NOT NULL, templates TEXT, descriptions TEXT, created_at REAL NOT NULL
);
"""


def user_version(path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_label_sets_are_kept_across_reopening(tmp_path):
    path = tmp_path / "ttaserve.db"
    store = SqliteStore(path)
    store.create_label_set(LabelSet("pets", ("cat", "dog"), ("a {}.",), {"cat": ["has whiskers"]}))
    with pytest.raises(Conflict):
        store.create_label_set(LabelSet("pets", ("x",)))
    store.close()
    again = SqliteStore(path)
    kept = again.get_label_set("pets")
    assert (kept.labels, kept.templates, kept.descriptions) == (("cat", "dog"), ("a {}.",), {"cat": ["has whiskers"]})
    again.delete_label_set("pets")
    with pytest.raises(NotFound):
        again.get_label_set("pets")
    assert again.schema_version == SCHEMA_VERSION == user_version(path)


def test_a_file_from_before_schema_versions_is_migrated_and_keeps_its_label_sets(tmp_path):
    path = tmp_path / "ttaserve.db"
    with sqlite3.connect(path) as db:
        db.executescript(UNVERSIONED)
        db.execute("INSERT INTO label_sets VALUES ('old', '[\"a\", \"b\"]', NULL, NULL, 1.0)")
    assert user_version(path) == 0
    store = SqliteStore(path)
    assert store.get_label_set("old").labels == ("a", "b")
    store.close()
    assert user_version(path) == SCHEMA_VERSION


def test_a_file_from_a_newer_server_is_refused_naming_the_setting(tmp_path):
    path = tmp_path / "ttaserve.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match=r"newer than this server's.*TTA_DATA_DIR"):
        SqliteStore(path)


# The tables as schema version 2 left them: before owners.
VERSION_2 = """
CREATE TABLE label_sets (
    name TEXT PRIMARY KEY, labels TEXT NOT NULL, templates TEXT, descriptions TEXT, created_at REAL NOT NULL
);
CREATE TABLE calibrations (
    label_set TEXT NOT NULL, method TEXT NOT NULL, label_set_fingerprint TEXT NOT NULL,
    model_fingerprint TEXT NOT NULL, model TEXT NOT NULL, report TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (label_set, method)
);
PRAGMA user_version = 2;
"""


def test_rows_from_before_owners_belong_to_no_key_and_each_owner_has_its_own_names(tmp_path):
    path = tmp_path / "ttaserve.db"
    with sqlite3.connect(path) as db:
        db.executescript(VERSION_2)
        db.execute("INSERT INTO label_sets VALUES ('pets', '[\"cat\", \"dog\"]', NULL, NULL, 1.0)")
        db.execute("INSERT INTO calibrations VALUES ('pets', 'zero_shot', 'f1', 'm1', '{}', '{\"images\": 20}', 2.0)")
    store = SqliteStore(path)
    assert store.get_label_set("pets").owner == ""
    assert [(r.owner, r.label_set, r.report) for r in store.calibrations()] == [("", "pets", {"images": 20})]
    with pytest.raises(NotFound):
        store.get_label_set("pets", owner="alice")  # invisible to a key

    store.create_label_set(LabelSet("pets", ("hamster",), owner="alice"))  # the same name, another owner
    assert store.get_label_set("pets", owner="alice").labels == ("hamster",)
    assert store.get_label_set("pets").labels == ("cat", "dog")
    assert [s.name for s in store.list_label_sets("bob")] == []
    store.delete_label_set("pets", owner="alice")
    assert store.get_label_set("pets").labels == ("cat", "dog")  # the other owner's is untouched
    assert len(store.calibrations()) == 1
    store.close()
    assert user_version(path) == SCHEMA_VERSION


def adapter(name: str, owner: str = "", group: str | None = None) -> AdapterRecord:
    return AdapterRecord(name, 0, {"type": "apex", "labels": ["a", "b"]}, "f" * 64, 3, group, "upload", 2.5, owner)


def test_adapters_get_the_next_version_per_owner_and_read_back_with_their_bytes(open_store):
    store = open_store()
    first = store.add_adapter(adapter("shapes", "alice", group="g"), b"one")
    second = store.add_adapter(adapter("shapes", "alice", group="g"), b"two")
    other = store.add_adapter(adapter("shapes", "bob"), b"bob's")
    assert (first.version, second.version, other.version) == (1, 2, 1)
    again = open_store()
    assert again.adapter("shapes", owner="alice") == second  # the newest by default
    assert again.adapter("shapes", 1, owner="alice") == first
    assert again.adapter_bytes("shapes", 1, owner="alice") == b"one"
    assert again.adapter_bytes("shapes", 1, owner="bob") == b"bob's"
    assert [a.ref for a in again.list_adapters("alice")] == ["shapes@v1", "shapes@v2"]
    assert again.list_adapters("carol") == []
    with pytest.raises(NotFound, match="shapes@v3"):
        again.adapter("shapes", 3, owner="alice")
    assert again.delete_adapter("shapes", 1, owner="alice") == 1
    assert again.add_adapter(adapter("shapes", "alice"), b"three").version == 3  # versions are never reused
    assert again.delete_adapter("shapes", owner="alice") == 2
    with pytest.raises(NotFound):
        again.adapter("shapes", owner="alice")
    assert again.adapter("shapes", owner="bob") == other  # another owner's are untouched


def test_jobs_keep_their_inputs_and_progress_and_are_seen_by_their_owner_only(open_store):
    store = open_store()
    job = JobRecord("j1", "finetune", "queued", {"label_set": "pets"}, created_at=1.0, updated_at=1.0, owner="alice")
    store.create_job(job, b"\x00images")
    store.create_job(JobRecord("j2", "finetune", "queued", {}, created_at=2.0, owner="bob"), b"")
    updated = open_store().update_job("j1", state="running", progress={"step": 3, "steps": 10, "loss": 0.5})
    assert updated.updated_at > 1.0
    again = open_store()
    assert again.job("j1", owner="alice") == updated
    assert again.job("j1", owner=None) == updated  # the worker reads any owner's
    with pytest.raises(NotFound):
        again.job("j1", owner="bob")
    assert again.job_inputs("j1") == b"\x00images"
    assert [j.id for j in again.list_jobs(None, ("queued", "running"))] == ["j1", "j2"]
    assert [j.id for j in again.list_jobs("alice")] == ["j1"]
    done = again.update_job("j1", state="succeeded", result={"adapter": "pets@v1"})
    assert again.job("j1", owner="alice").result == {"adapter": "pets@v1"} == done.result
    assert again.job_inputs("j1") == b""  # an ended job keeps no images
    with pytest.raises(NotFound):
        again.update_job("nope", state="failed")


def test_sessions_are_kept_per_owner_replaced_and_forgotten_by_age(open_store):
    store = open_store()
    store.save_session("alice", "cam-1", b"first", 10.0)
    store.save_session("alice", "cam-1", b"second", 20.0)
    store.save_session("bob", "cam-1", b"bob's", 5.0)
    again = open_store()
    assert again.load_session("alice", "cam-1") == (b"second", 20.0)
    assert again.load_session("carol", "cam-1") is None
    assert again.delete_sessions_unused_since(10.0) == 1  # bob's
    assert again.load_session("bob", "cam-1") is None
    assert again.delete_session("alice", "cam-1") is True
    assert again.delete_session("alice", "cam-1") is False
