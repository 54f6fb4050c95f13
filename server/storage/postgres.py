"""A store in PostgreSQL (``TTA_DATABASE_URL=postgresql://...``), shared by every replica, with versioned migrations.

The tables are those of the SQLite store (owners included; adapters and jobs since migration 2); the table
``tta_schema_migrations`` holds one row per migration applied. Opening a database applies the
migrations it has not had yet, each in its own transaction under an advisory lock, so replicas that
start together migrate it once; a database from a newer server is refused.

Nothing is cached here: every call reads or writes the database, so what one replica stores, the next
request to any replica sees (the text features a process caches are keyed by a label set's labels,
templates and descriptions, never by its name, so a set changed elsewhere cannot be served stale).

One connection per process, used under a lock, in autocommit; a lost connection is opened again on the
next call. A read that meets a lost connection is retried once on a new one; a write is not (whether it
was committed is unknown), and answers 503 ``storage_unavailable`` with ``Retry-After``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from server.errors import (
    ConfigError,
    StorageFull,
    StorageReadOnly,
    StorageUnavailable,
)
from server.settings import redact_url
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

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.types.json import Json
except ImportError:  # the optional extra: SQLite-only installs do without it
    psycopg = None  # type: ignore[assignment]

T = TypeVar("T")

# Migration n (1-based) brings a database from version n-1 to n. Append; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    # 1: label sets and their calibrations, each kept for an owner (the API key's name, '' without keys), as the
    # SQLite store holds them at its version 3. JSON columns keep the text as written (key order included).
    """
    CREATE TABLE label_sets (
        owner TEXT NOT NULL DEFAULT '',
        name TEXT NOT NULL,
        labels JSON NOT NULL,          -- list of strings
        templates JSON,                -- list of strings, or NULL for the request's/server's default
        descriptions JSON,             -- object: label -> list of descriptions, or NULL
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (owner, name)
    );
    CREATE TABLE calibrations (
        owner TEXT NOT NULL DEFAULT '',
        label_set TEXT NOT NULL,
        method TEXT NOT NULL,
        label_set_fingerprint TEXT NOT NULL,  -- the label set it was fitted for
        model_fingerprint TEXT NOT NULL,      -- the model it was fitted with
        model JSON NOT NULL,                  -- the confidence model
        report JSON NOT NULL,                 -- images, held-out ECE
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (owner, label_set, method)
    );
    """,
    # 2: few-shot adapters (every version's artifact bytes beside its record) and the jobs that train them, as the
    # SQLite store holds them at its version 4.
    """
    CREATE TABLE adapters (
        owner TEXT NOT NULL DEFAULT '',
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        grp TEXT,
        card JSON NOT NULL,
        sha256 TEXT NOT NULL,
        nbytes BIGINT NOT NULL,
        source TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (owner, name, version)
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        spec JSON NOT NULL,
        progress JSON NOT NULL,
        result JSON,
        error TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        inputs BYTEA NOT NULL
    );
    """,
    # 3: online sessions' state, as the SQLite store holds it at its version 5.
    """
    CREATE TABLE sessions (
        owner TEXT NOT NULL DEFAULT '',
        id TEXT NOT NULL,
        last_used DOUBLE PRECISION NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (owner, id)
    );
    CREATE INDEX sessions_last_used ON sessions (last_used);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
MIGRATION_TABLE = "tta_schema_migrations"
# pg_advisory_xact_lock's key for migrating: any constant other applications are unlikely to take ("TTA" + 1).
MIGRATION_LOCK = 0x54544101
CONNECT_TIMEOUT_S = 5  # unless the URL sets connect_timeout
RETRY_AFTER_S = 1.0

log = logging.getLogger("ttaserve.storage")


def storage_error(exc: Exception, where: str) -> Exception | None:
    """The typed error for a failure of the database at ``where`` (a redacted URL): out of disk, refusing writes,
    or unreachable; None for another failure (a bug, raised as is)."""
    if psycopg is None:
        return None
    if isinstance(exc, pg_errors.DiskFull):
        return StorageFull(f"the database {where} (TTA_DATABASE_URL) is out of disk space; free space on its server")
    if isinstance(exc, (pg_errors.ReadOnlySqlTransaction, pg_errors.InsufficientPrivilege)):
        return StorageReadOnly(
            f"the database {where} (TTA_DATABASE_URL) refuses writes (a read-only server or role): label sets "
            "can be read, not changed",
            retry_after_s=RETRY_AFTER_S,
        )
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        reason = " ".join(str(exc).split())[:300]
        return StorageUnavailable(
            f"the database {where} (TTA_DATABASE_URL) cannot be reached: {reason}; retry shortly",
            retry_after_s=RETRY_AFTER_S,
        )
    return None


class PostgresStore:
    """A thread-safe store in PostgreSQL; every write is committed before the call returns."""

    def __init__(self, url: str):
        if psycopg is None:
            raise ConfigError(
                "TTA_DATABASE_URL names PostgreSQL but psycopg is not installed: pip install 'ttaserve[postgres]'"
            )
        self.where = redact_url(url)
        try:
            self._params: dict[str, Any] = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"TTA_DATABASE_URL ({self.where}) is not a PostgreSQL URL: {self._scrub(exc)}") from None
        self._params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        self._params.setdefault("application_name", "ttaserve")
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        try:
            with self._lock:
                self.schema_version = self._migrate(self._connection())
        except ConfigError:
            self.close()
            raise
        except psycopg.Error as exc:
            self.close()
            raise ConfigError(
                f"cannot open the database {self.where}: {self._scrub(exc)}; check TTA_DATABASE_URL"
            ) from None

    def _scrub(self, exc: BaseException) -> str:
        """An error's text, one line, with the URL's password removed should a driver ever repeat it."""
        text = " ".join(str(exc).split())
        password = str(self._params.get("password") or "") if hasattr(self, "_params") else ""
        return text.replace(password, "***") if password else text

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(**self._params, autocommit=True)
        return self._conn

    def _version(self, conn: psycopg.Connection[Any]) -> int:
        """The schema version of the database: 0 before the migration table exists."""
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (MIGRATION_TABLE,)).fetchone()
        if not (row and row[0]):
            return 0
        row = conn.execute(f"SELECT coalesce(max(version), 0) FROM {MIGRATION_TABLE}").fetchone()
        return int(row[0]) if row else 0

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"the database {self.where} has schema version {version}, newer than this server's "
                f"{SCHEMA_VERSION}: run a newer TTAServe, or point TTA_DATABASE_URL elsewhere"
            )

    def _migrate(self, conn: psycopg.Connection[Any]) -> int:
        """Bring the database to SCHEMA_VERSION. A database already there is only read (a read-only server or
        role can serve reads); otherwise each migration runs in its own transaction under an advisory lock,
        so that replicas starting together apply each one once."""
        version = self._version(conn)
        self._refuse_newer(version)
        while version < SCHEMA_VERSION:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {MIGRATION_TABLE} ("
                    "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                version = self._version(conn)  # another replica may have migrated while we waited for the lock
                self._refuse_newer(version)
                if version < SCHEMA_VERSION:
                    conn.execute(MIGRATIONS[version])
                    version += 1
                    conn.execute(f"INSERT INTO {MIGRATION_TABLE} (version) VALUES (%s)", (version,))
                    log.info("migrated the database %s to schema version %d", self.where, version)
        return version

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextmanager
    def _writing(self) -> Iterator[psycopg.Connection[Any]]:
        """The connection, under the lock, for a write: a full disk, a read-only server or a lost connection
        raise StorageFull, StorageReadOnly or StorageUnavailable instead of a bare psycopg error."""
        with self._lock:
            try:
                yield self._connection()
            except psycopg.Error as exc:
                typed = storage_error(exc, self.where)
                if typed is None:
                    raise
                if isinstance(typed, StorageUnavailable):
                    self._drop_connection()
                log.warning("a write to the database %s failed: %s", self.where, self._scrub(exc))
                raise typed from None

    def _read(self, query: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``query`` on the connection, under the lock; once more on a new connection if the first was lost."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    return query(self._connection())
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    self._drop_connection()
                    if attempt == 2:
                        log.warning("a read from the database %s failed: %s", self.where, self._scrub(exc))
                        raise (storage_error(exc, self.where) or exc) from None
        raise AssertionError("unreachable")

    def create_label_set(self, label_set: LabelSet) -> LabelSet:
        row = (
            label_set.owner,
            label_set.name,
            Json(list(label_set.labels)),
            Json(list(label_set.templates)) if label_set.templates is not None else None,
            Json(label_set.descriptions) if label_set.descriptions is not None else None,
            label_set.created_at,
        )
        with self._writing() as db:
            try:
                db.execute("INSERT INTO label_sets VALUES (%s, %s, %s, %s, %s, %s)", row)
            except pg_errors.UniqueViolation:
                raise label_set_exists(label_set.name) from None
        return label_set

    def get_label_set(self, name: str, owner: str = "") -> LabelSet:
        row = self._read(
            lambda db: db.execute(
                "SELECT owner, name, labels, templates, descriptions, created_at FROM label_sets "
                "WHERE owner = %s AND name = %s",
                (owner, name),
            ).fetchone()
        )
        if row is None:
            raise no_label_set(name, LIST_HINT)
        return _from_row(row)

    def list_label_sets(self, owner: str = "") -> list[LabelSet]:
        rows = self._read(
            lambda db: db.execute(
                "SELECT owner, name, labels, templates, descriptions, created_at FROM label_sets "
                'WHERE owner = %s ORDER BY name COLLATE "C"',
                (owner,),
            ).fetchall()
        )
        return [_from_row(r) for r in rows]

    def delete_label_set(self, name: str, owner: str = "") -> None:
        with self._writing() as db, db.transaction():
            deleted = db.execute("DELETE FROM label_sets WHERE owner = %s AND name = %s", (owner, name)).rowcount
            db.execute("DELETE FROM calibrations WHERE owner = %s AND label_set = %s", (owner, name))
        if deleted == 0:
            raise no_label_set(name)

    def save_calibration(self, record: CalibrationRecord) -> None:
        row = (
            record.owner,
            record.label_set,
            record.method,
            record.label_set_fingerprint,
            record.model_fingerprint,
            Json(record.model),
            Json(record.report),
            record.created_at,
        )
        with self._writing() as db:
            db.execute(
                "INSERT INTO calibrations VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (owner, label_set, method) DO UPDATE SET "
                "label_set_fingerprint = EXCLUDED.label_set_fingerprint, "
                "model_fingerprint = EXCLUDED.model_fingerprint, "
                "model = EXCLUDED.model, report = EXCLUDED.report, created_at = EXCLUDED.created_at",
                row,
            )

    def delete_calibrations(self, label_set: str, owner: str = "") -> None:
        with self._writing() as db:
            db.execute("DELETE FROM calibrations WHERE owner = %s AND label_set = %s", (owner, label_set))

    def calibrations(self, label_set: str | None = None, owner: str = "") -> list[CalibrationRecord]:
        columns = "owner, label_set, method, label_set_fingerprint, model_fingerprint, model, report, created_at"
        if label_set is None:
            query = f'SELECT {columns} FROM calibrations ORDER BY owner COLLATE "C", label_set COLLATE "C", method'
            rows = self._read(lambda db: db.execute(query).fetchall())
        else:
            query = (
                f'SELECT {columns} FROM calibrations WHERE owner = %s AND label_set = %s ORDER BY method COLLATE "C"'
            )
            rows = self._read(lambda db: db.execute(query, (owner, label_set)).fetchall())
        return [CalibrationRecord(r[1], r[2], r[3], r[4], r[5], r[6], r[7], owner=r[0]) for r in rows]

    # -- adapters -----------------------------------------------------------------------------------
    _ADAPTER_COLUMNS = "owner, name, version, grp, card, sha256, nbytes, source, created_at"

    def add_adapter(self, record: AdapterRecord, data: bytes) -> AdapterRecord:
        # The next version is read and written in one statement; two replicas adding the same name at once
        # collide on the key, and the loser takes the version after.
        for _ in range(5):
            try:
                with self._writing() as db, db.transaction():
                    row = db.execute(
                        "SELECT COALESCE(MAX(version), 0) + 1 FROM adapters WHERE owner = %s AND name = %s",
                        (record.owner, record.name),
                    ).fetchone()
                    stored = dataclasses.replace(record, version=int(row[0]) if row else 1)
                    db.execute(
                        f"INSERT INTO adapters ({self._ADAPTER_COLUMNS}, data) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (*adapter_row(stored), data),
                    )
                return stored
            except pg_errors.UniqueViolation:
                continue
        raise StorageUnavailable(
            f"could not give adapter {record.name!r} a version: retry", retry_after_s=RETRY_AFTER_S
        )

    def adapter(self, name: str, version: int | None = None, owner: str = "") -> AdapterRecord:
        where, args = "owner = %s AND name = %s", list[Any]([owner, name])
        if version is not None:
            where, args = where + " AND version = %s", [*args, version]
        query = f"SELECT {self._ADAPTER_COLUMNS} FROM adapters WHERE {where} ORDER BY version DESC LIMIT 1"
        row = self._read(lambda db: db.execute(query, args).fetchone())
        if row is None:
            raise no_adapter(name, version)
        return adapter_from_row(row)

    def adapter_bytes(self, name: str, version: int, owner: str = "") -> bytes:
        query = "SELECT data FROM adapters WHERE owner = %s AND name = %s AND version = %s"
        row = self._read(lambda db: db.execute(query, (owner, name, version)).fetchone())
        if row is None:
            raise no_adapter(name, version)
        return bytes(row[0])

    def list_adapters(self, owner: str = "") -> list[AdapterRecord]:
        query = f'SELECT {self._ADAPTER_COLUMNS} FROM adapters WHERE owner = %s ORDER BY name COLLATE "C", version'
        rows = self._read(lambda db: db.execute(query, (owner,)).fetchall())
        return [adapter_from_row(r) for r in rows]

    def delete_adapter(self, name: str, version: int | None = None, owner: str = "") -> int:
        where, args = "owner = %s AND name = %s", list[Any]([owner, name])
        if version is not None:
            where, args = where + " AND version = %s", [*args, version]
        with self._writing() as db:
            deleted = db.execute(f"DELETE FROM adapters WHERE {where}", args).rowcount
        if not deleted:
            raise no_adapter(name, version)
        return int(deleted)

    # -- jobs ---------------------------------------------------------------------------------------
    _JOB_COLUMNS = "id, owner, kind, state, spec, progress, result, error, created_at, updated_at"

    def create_job(self, job: JobRecord, inputs: bytes) -> JobRecord:
        with self._writing() as db:
            db.execute(
                f"INSERT INTO jobs ({self._JOB_COLUMNS}, inputs) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (*job_row(job), inputs),
            )
        return job

    def update_job(self, job_id: str, **changes: Any) -> JobRecord:
        with self._writing() as db, db.transaction():
            row = db.execute(f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
            if row is None:
                raise no_job(job_id)
            job = dataclasses.replace(job_from_row(row), **changes, updated_at=time.time())
            _, _, _, state, _, progress, result, error, _, updated_at = job_row(job)
            db.execute(
                "UPDATE jobs SET state = %s, progress = %s, result = %s, error = %s, updated_at = %s, "
                "inputs = CASE WHEN %s THEN ''::bytea ELSE inputs END WHERE id = %s",
                (state, progress, result, error, updated_at, job.state in JOB_FINAL, job_id),
            )
        return job

    def job(self, job_id: str, owner: str | None = "") -> JobRecord:
        query = f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE id = %s"
        row = self._read(lambda db: db.execute(query, (job_id,)).fetchone())
        if row is None or (owner is not None and row[1] != owner):
            raise no_job(job_id)
        return job_from_row(row)

    def job_inputs(self, job_id: str) -> bytes:
        row = self._read(lambda db: db.execute("SELECT inputs FROM jobs WHERE id = %s", (job_id,)).fetchone())
        if row is None:
            raise no_job(job_id)
        return bytes(row[0])

    def list_jobs(self, owner: str | None = "", states: tuple[str, ...] | None = None) -> list[JobRecord]:
        where, args = ["TRUE"], list[Any]()
        if owner is not None:
            where, args = [*where, "owner = %s"], [*args, owner]
        if states:
            where, args = [*where, "state = ANY(%s)"], [*args, list(states)]
        query = f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY created_at, id"
        rows = self._read(lambda db: db.execute(query, args).fetchall())
        return [job_from_row(r) for r in rows]

    # -- sessions -----------------------------------------------------------------------------------
    def save_session(self, owner: str, session_id: str, data: bytes, last_used: float) -> None:
        with self._writing() as db:
            db.execute(
                "INSERT INTO sessions VALUES (%s, %s, %s, %s) ON CONFLICT (owner, id) DO UPDATE SET "
                "last_used = EXCLUDED.last_used, data = EXCLUDED.data",
                (owner, session_id, last_used, data),
            )

    def load_session(self, owner: str, session_id: str) -> tuple[bytes, float] | None:
        query = "SELECT data, last_used FROM sessions WHERE owner = %s AND id = %s"
        row = self._read(lambda db: db.execute(query, (owner, session_id)).fetchone())
        return (bytes(row[0]), float(row[1])) if row is not None else None

    def delete_session(self, owner: str, session_id: str) -> bool:
        with self._writing() as db:
            return bool(db.execute("DELETE FROM sessions WHERE owner = %s AND id = %s", (owner, session_id)).rowcount)

    def delete_sessions_unused_since(self, when: float) -> int:
        with self._writing() as db:
            return int(db.execute("DELETE FROM sessions WHERE last_used < %s", (when,)).rowcount)


def _from_row(row: tuple[Any, ...]) -> LabelSet:
    owner, name, labels, templates, descriptions, created_at = row
    return LabelSet(
        owner=owner,
        name=name,
        labels=tuple(labels),
        templates=tuple(templates) if templates is not None else None,
        descriptions=descriptions,
        created_at=created_at,
    )
