"""Durable state: label sets in an embedded SQLite file in the data directory.

Label sets survive restarts. The model's own label sets (from its ``ttaserve.json``) are listed
beside them, read-only. The store is the place later state goes too (adapters, jobs, sessions), so
it owns its schema and migrations in one place.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import Conflict, NotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS label_sets (
    name TEXT PRIMARY KEY,
    labels TEXT NOT NULL,          -- JSON list of strings
    templates TEXT,                -- JSON list of strings, or NULL for the request's/server's default
    descriptions TEXT,             -- JSON object: label -> list of descriptions, or NULL
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class LabelSet:
    name: str
    labels: tuple[str, ...]
    templates: tuple[str, ...] | None = None
    descriptions: dict[str, list[str]] | None = None
    created_at: float = field(default_factory=time.time)
    source: str = "user"  # "user" (stored) or "model" (shipped with the model, read-only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "labels": list(self.labels),
            "templates": list(self.templates) if self.templates is not None else None,
            "descriptions": self.descriptions,
            "created_at": self.created_at,
            "source": self.source,
        }


class Store:
    """A thread-safe SQLite store; every write is committed before the call returns."""

    def __init__(self, path: Path, builtin: dict[str, LabelSet] | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self.builtin = dict(builtin or {})

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create_label_set(self, label_set: LabelSet) -> LabelSet:
        if label_set.name in self.builtin:
            raise Conflict(f"label set {label_set.name!r} is provided by the model and cannot be replaced",
                           code="label_set_exists")
        row = (
            label_set.name,
            json.dumps(list(label_set.labels)),
            json.dumps(list(label_set.templates)) if label_set.templates is not None else None,
            json.dumps(label_set.descriptions) if label_set.descriptions is not None else None,
            label_set.created_at,
        )
        with self._lock:
            try:
                self._db.execute("INSERT INTO label_sets VALUES (?, ?, ?, ?, ?)", row)
            except sqlite3.IntegrityError:
                raise Conflict(
                    f"label set {label_set.name!r} already exists; DELETE it first to replace it",
                    code="label_set_exists",
                ) from None
        return label_set

    def get_label_set(self, name: str) -> LabelSet:
        if name in self.builtin:
            return self.builtin[name]
        with self._lock:
            row = self._db.execute("SELECT * FROM label_sets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no label set named {name!r}; GET /v1/label-sets lists them", code="unknown_label_set")
        return _from_row(row)

    def list_label_sets(self) -> list[LabelSet]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM label_sets ORDER BY name").fetchall()
        return sorted(self.builtin.values(), key=lambda s: s.name) + [_from_row(r) for r in rows]

    def delete_label_set(self, name: str) -> None:
        if name in self.builtin:
            raise Conflict(f"label set {name!r} is provided by the model and cannot be deleted",
                           code="label_set_builtin")
        with self._lock:
            cursor = self._db.execute("DELETE FROM label_sets WHERE name = ?", (name,))
        if cursor.rowcount == 0:
            raise NotFound(f"no label set named {name!r}", code="unknown_label_set")


def _from_row(row: tuple[Any, ...]) -> LabelSet:
    name, labels, templates, descriptions, created_at = row
    return LabelSet(
        name=name,
        labels=tuple(json.loads(labels)),
        templates=tuple(json.loads(templates)) if templates is not None else None,
        descriptions=json.loads(descriptions) if descriptions is not None else None,
        created_at=created_at,
    )
