"""The SQLite store: durable label sets, a schema version, and migrations from older files."""

from __future__ import annotations

import sqlite3

import pytest

from server.errors import ConfigError, Conflict, NotFound
from server.storage import LabelSet, SqliteStore
from server.storage.sqlite import SCHEMA_VERSION

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
