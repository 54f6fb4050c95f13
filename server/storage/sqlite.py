"""The default store: an embedded SQLite file in the data directory, with a schema version and migrations.

The database's ``user_version`` is its schema version; opening a file applies the migrations it has
not had yet, each in its own transaction, and refuses a file from a newer server. A file written
before versions existed (``user_version`` 0, the label-set table already there) takes migration 1,
which creates nothing it already has.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.errors import ConfigError, StorageFull, StorageReadOnly
from server.storage.base import (
    JOB_FINAL,
    LIST_HINT,
    AdapterRecord,
    CalibrationRecord,
    JobRecord,
    LabelSet,
    label_set_exists,
    no_adapter,
    no_job,
    no_label_set,
)
from server.storage.rows import adapter_from_row, adapter_row, job_from_row, job_row

# Migration n (1-based) brings a database from version n-1 to n. Append; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS label_sets (
        name TEXT PRIMARY KEY,
        labels TEXT NOT NULL,          -- JSON list of strings
        templates TEXT,                -- JSON list of strings, or NULL for the request's/server's default
        descriptions TEXT,             -- JSON object: label -> list of descriptions, or NULL
        created_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE calibrations (
        label_set TEXT NOT NULL,
        method TEXT NOT NULL,
        label_set_fingerprint TEXT NOT NULL,  -- the label set it was fitted for
        model_fingerprint TEXT NOT NULL,      -- the model it was fitted with
        model TEXT NOT NULL,                  -- JSON: the confidence model
        report TEXT NOT NULL,                 -- JSON: images, held-out ECE
        created_at REAL NOT NULL,
        PRIMARY KEY (label_set, method)
    );
    """,
    # 3: tenants. Every row belongs to the name of the API key that stored it ('' without keys, and for the rows
    # stored before keys existed); names are unique per owner. SQLite cannot change a primary key in place.
    """
    CREATE TABLE label_sets_3 (
        owner TEXT NOT NULL DEFAULT '',
        name TEXT NOT NULL,
        labels TEXT NOT NULL,
        templates TEXT,
        descriptions TEXT,
        created_at REAL NOT NULL,
        PRIMARY KEY (owner, name)
    );
    INSERT INTO label_sets_3 SELECT '', name, labels, templates, descriptions, created_at FROM label_sets;
    DROP TABLE label_sets;
    ALTER TABLE label_sets_3 RENAME TO label_sets;
    CREATE TABLE calibrations_3 (
        owner TEXT NOT NULL DEFAULT '',
        label_set TEXT NOT NULL,
        method TEXT NOT NULL,
        label_set_fingerprint TEXT NOT NULL,
        model_fingerprint TEXT NOT NULL,
        model TEXT NOT NULL,
        report TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (owner, label_set, method)
    );
    INSERT INTO calibrations_3 SELECT '', * FROM calibrations;
    DROP TABLE calibrations;
    ALTER TABLE calibrations_3 RENAME TO calibrations;
    """,
    # 4: few-shot adapters (every version's artifact bytes beside its record) and the jobs that train them.
    """
    CREATE TABLE adapters (
        owner TEXT NOT NULL DEFAULT '',
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        grp TEXT,                      -- the adapter group (merging), or NULL
        card TEXT NOT NULL,            -- JSON: the artifact's card
        sha256 TEXT NOT NULL,
        nbytes INTEGER NOT NULL,
        source TEXT NOT NULL,          -- upload, job:<id>, merge:<group>
        created_at REAL NOT NULL,
        data BLOB NOT NULL,            -- the safetensors artifact
        PRIMARY KEY (owner, name, version)
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        spec TEXT NOT NULL,            -- JSON: the request without its images
        progress TEXT NOT NULL,        -- JSON
        result TEXT,                   -- JSON, or NULL
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        inputs BLOB NOT NULL           -- the images, serialized
    );
    """,
    # 5: online sessions' state, one row per session.
    """
    CREATE TABLE sessions (
        owner TEXT NOT NULL DEFAULT '',
        id TEXT NOT NULL,
        last_used REAL NOT NULL,
        data BLOB NOT NULL,            -- the session's state (server.service.sessions)
        PRIMARY KEY (owner, id)
    );
    CREATE INDEX sessions_last_used ON sessions (last_used);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

log = logging.getLogger("ttaserve.storage")


def storage_error(exc: sqlite3.Error, path: Path) -> Exception | None:
    """The typed error for a write that failed because the disk is full or read-only; None for another failure."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    text = str(exc)
    if name == "SQLITE_FULL" or "database or disk is full" in text:
        return StorageFull(f"the disk of the data directory ({path.parent}, TTA_DATA_DIR) is full; free space there")
    if name.startswith("SQLITE_READONLY") or "readonly database" in text:
        return StorageReadOnly(
            f"the data directory ({path.parent}, TTA_DATA_DIR) is read-only: label sets can be read, not changed"
        )
    return None


class SqliteStore:
    """A thread-safe SQLite store; every write is committed (and synced) before the call returns."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        except (OSError, sqlite3.Error) as exc:
            # A read-only or missing mount, a full disk: one line naming the setting, not a traceback.
            raise ConfigError(
                f"cannot open the store {path}: {exc}; TTA_DATA_DIR must be a writable directory"
            ) from None
        self._lock = threading.Lock()
        try:
            self.schema_version = self._migrate()
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot prepare the store {path}: {exc}; check TTA_DATA_DIR") from None

    def _migrate(self) -> int:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            self._db.close()
            raise ConfigError(
                f"{self.path} has schema version {version}, newer than this server's "
                f"{SCHEMA_VERSION}: run a newer TTAServe, or point TTA_DATA_DIR elsewhere"
            )
        for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
            try:
                self._db.executescript(f"BEGIN; {script} PRAGMA user_version = {target}; COMMIT;")
            except sqlite3.Error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._db.close()
                raise
        return SCHEMA_VERSION

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, for a write: a failed one is rolled back, and a full or read-only
        disk raises StorageFull or StorageReadOnly instead of a bare sqlite3 error."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                typed = storage_error(exc, self.path)
                if typed is None:
                    raise
                log.warning("a write to %s failed: %s", self.path, exc)
                raise typed from exc

    def create_label_set(self, label_set: LabelSet) -> LabelSet:
        row = (
            label_set.owner,
            label_set.name,
            json.dumps(list(label_set.labels)),
            json.dumps(list(label_set.templates)) if label_set.templates is not None else None,
            json.dumps(label_set.descriptions) if label_set.descriptions is not None else None,
            label_set.created_at,
        )
        with self._writing() as db:
            try:
                db.execute("INSERT INTO label_sets VALUES (?, ?, ?, ?, ?, ?)", row)
            except sqlite3.IntegrityError:
                raise label_set_exists(label_set.name) from None
        return label_set

    def get_label_set(self, name: str, owner: str = "") -> LabelSet:
        with self._lock:
            row = self._db.execute("SELECT * FROM label_sets WHERE owner = ? AND name = ?", (owner, name)).fetchone()
        if row is None:
            raise no_label_set(name, LIST_HINT)
        return _from_row(row)

    def list_label_sets(self, owner: str = "") -> list[LabelSet]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM label_sets WHERE owner = ? ORDER BY name", (owner,)).fetchall()
        return [_from_row(r) for r in rows]

    def delete_label_set(self, name: str, owner: str = "") -> None:
        with self._writing() as db:
            db.execute("BEGIN")
            cursor = db.execute("DELETE FROM label_sets WHERE owner = ? AND name = ?", (owner, name))
            db.execute("DELETE FROM calibrations WHERE owner = ? AND label_set = ?", (owner, name))
            db.execute("COMMIT")
        if cursor.rowcount == 0:
            raise no_label_set(name)

    def save_calibration(self, record: CalibrationRecord) -> None:
        row = (
            record.owner,
            record.label_set,
            record.method,
            record.label_set_fingerprint,
            record.model_fingerprint,
            json.dumps(record.model),
            json.dumps(record.report),
            record.created_at,
        )
        with self._writing() as db:
            db.execute("INSERT OR REPLACE INTO calibrations VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)

    def delete_calibrations(self, label_set: str, owner: str = "") -> None:
        with self._writing() as db:
            db.execute("DELETE FROM calibrations WHERE owner = ? AND label_set = ?", (owner, label_set))

    def calibrations(self, label_set: str | None = None, owner: str = "") -> list[CalibrationRecord]:
        with self._lock:
            if label_set is None:
                rows = self._db.execute("SELECT * FROM calibrations ORDER BY owner, label_set, method").fetchall()
            else:
                query = "SELECT * FROM calibrations WHERE owner = ? AND label_set = ? ORDER BY method"
                rows = self._db.execute(query, (owner, label_set)).fetchall()
        return [
            CalibrationRecord(r[1], r[2], r[3], r[4], json.loads(r[5]), json.loads(r[6]), r[7], owner=r[0])
            for r in rows
        ]

    # -- adapters -----------------------------------------------------------------------------------
    _ADAPTER_COLUMNS = "owner, name, version, grp, card, sha256, nbytes, source, created_at"

    def add_adapter(self, record: AdapterRecord, data: bytes) -> AdapterRecord:
        with self._writing() as db:
            db.execute("BEGIN IMMEDIATE")
            query = "SELECT COALESCE(MAX(version), 0) + 1 FROM adapters WHERE owner = ? AND name = ?"
            version = int(db.execute(query, (record.owner, record.name)).fetchone()[0])
            stored = dataclasses.replace(record, version=version)
            row = (*adapter_row(stored), sqlite3.Binary(data))
            db.execute(f"INSERT INTO adapters ({self._ADAPTER_COLUMNS}, data) VALUES (?,?,?,?,?,?,?,?,?,?)", row)
            db.execute("COMMIT")
        return stored

    def adapter(self, name: str, version: int | None = None, owner: str = "") -> AdapterRecord:
        where, args = "owner = ? AND name = ?", list[Any]([owner, name])
        if version is not None:
            where, args = where + " AND version = ?", [*args, version]
        query = f"SELECT {self._ADAPTER_COLUMNS} FROM adapters WHERE {where} ORDER BY version DESC LIMIT 1"
        with self._lock:
            row = self._db.execute(query, args).fetchone()
        if row is None:
            raise no_adapter(name, version)
        return adapter_from_row(row)

    def adapter_bytes(self, name: str, version: int, owner: str = "") -> bytes:
        query = "SELECT data FROM adapters WHERE owner = ? AND name = ? AND version = ?"
        with self._lock:
            row = self._db.execute(query, (owner, name, version)).fetchone()
        if row is None:
            raise no_adapter(name, version)
        return bytes(row[0])

    def list_adapters(self, owner: str = "") -> list[AdapterRecord]:
        query = f"SELECT {self._ADAPTER_COLUMNS} FROM adapters WHERE owner = ? ORDER BY name, version"
        with self._lock:
            rows = self._db.execute(query, (owner,)).fetchall()
        return [adapter_from_row(r) for r in rows]

    def delete_adapter(self, name: str, version: int | None = None, owner: str = "") -> int:
        where, args = "owner = ? AND name = ?", list[Any]([owner, name])
        if version is not None:
            where, args = where + " AND version = ?", [*args, version]
        with self._writing() as db:
            deleted = db.execute(f"DELETE FROM adapters WHERE {where}", args).rowcount
        if not deleted:
            raise no_adapter(name, version)
        return int(deleted)

    # -- jobs ---------------------------------------------------------------------------------------
    _JOB_COLUMNS = "id, owner, kind, state, spec, progress, result, error, created_at, updated_at"

    def create_job(self, job: JobRecord, inputs: bytes) -> JobRecord:
        row = (*job_row(job), sqlite3.Binary(inputs))
        with self._writing() as db:
            db.execute(f"INSERT INTO jobs ({self._JOB_COLUMNS}, inputs) VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
        return job

    def update_job(self, job_id: str, **changes: Any) -> JobRecord:
        with self._writing() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                raise no_job(job_id)
            job = dataclasses.replace(job_from_row(row), **changes, updated_at=time.time())
            _, _, _, state, _, progress, result, error, _, updated_at = job_row(job)
            final = job.state in JOB_FINAL  # an ended job's images are needed no more
            db.execute(
                "UPDATE jobs SET state = ?, progress = ?, result = ?, error = ?, updated_at = ?, "
                "inputs = CASE WHEN ? THEN X'' ELSE inputs END WHERE id = ?",
                (state, progress, result, error, updated_at, final, job_id),
            )
            db.execute("COMMIT")
        return job

    def job(self, job_id: str, owner: str | None = "") -> JobRecord:
        with self._lock:
            row = self._db.execute(f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (owner is not None and row[1] != owner):
            raise no_job(job_id)
        return job_from_row(row)

    def job_inputs(self, job_id: str) -> bytes:
        with self._lock:
            row = self._db.execute("SELECT inputs FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise no_job(job_id)
        return bytes(row[0])

    def list_jobs(self, owner: str | None = "", states: tuple[str, ...] | None = None) -> list[JobRecord]:
        where, args = ["1 = 1"], list[Any]()
        if owner is not None:
            where, args = [*where, "owner = ?"], [*args, owner]
        if states:
            where, args = [*where, f"state IN ({', '.join('?' * len(states))})"], [*args, *states]
        query = f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY created_at, id"
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [job_from_row(r) for r in rows]

    # -- sessions -----------------------------------------------------------------------------------
    def save_session(self, owner: str, session_id: str, data: bytes, last_used: float) -> None:
        with self._writing() as db:
            db.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
                (owner, session_id, last_used, sqlite3.Binary(data)),
            )

    def load_session(self, owner: str, session_id: str) -> tuple[bytes, float] | None:
        query = "SELECT data, last_used FROM sessions WHERE owner = ? AND id = ?"
        with self._lock:
            row = self._db.execute(query, (owner, session_id)).fetchone()
        return (bytes(row[0]), float(row[1])) if row is not None else None

    def delete_session(self, owner: str, session_id: str) -> bool:
        with self._writing() as db:
            return bool(db.execute("DELETE FROM sessions WHERE owner = ? AND id = ?", (owner, session_id)).rowcount)

    def delete_sessions_unused_since(self, when: float) -> int:
        with self._writing() as db:
            return int(db.execute("DELETE FROM sessions WHERE last_used < ?", (when,)).rowcount)


def _from_row(row: tuple[Any, ...]) -> LabelSet:
    owner, name, labels, templates, descriptions, created_at = row
    return LabelSet(
        owner=owner,
        name=name,
        labels=tuple(json.loads(labels)),
        templates=tuple(json.loads(templates)) if templates is not None else None,
        descriptions=json.loads(descriptions) if descriptions is not None else None,
        created_at=created_at,
    )
