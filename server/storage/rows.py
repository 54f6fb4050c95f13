"""Adapter and job records as table rows, the same columns in the SQLite and the PostgreSQL store.

JSON columns are written as text; read back, SQLite gives text and PostgreSQL's JSON columns give it parsed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from server.storage.base import AdapterRecord, JobRecord


def adapter_row(r: AdapterRecord) -> tuple[Any, ...]:
    return (r.owner, r.name, r.version, r.group, json.dumps(r.card), r.sha256, r.nbytes, r.source, r.created_at)


def adapter_from_row(row: Sequence[Any]) -> AdapterRecord:
    owner, name, version, group, card, sha256, nbytes, source, created_at = row
    card = json.loads(card) if isinstance(card, str) else card
    return AdapterRecord(name, int(version), card, sha256, int(nbytes), group, source, float(created_at), owner)


def job_row(j: JobRecord) -> tuple[Any, ...]:
    result = json.dumps(j.result) if j.result is not None else None
    return (j.id, j.owner, j.kind, j.state, json.dumps(j.spec), json.dumps(j.progress), result, j.error,
            j.created_at, j.updated_at)  # fmt: skip


def job_from_row(row: Sequence[Any]) -> JobRecord:
    job_id, owner, kind, state, spec, progress, result, error, created_at, updated_at = row

    def parsed(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    return JobRecord(
        id=job_id,
        kind=kind,
        state=state,
        spec=parsed(spec),
        progress=parsed(progress),
        result=parsed(result),
        error=error,
        created_at=float(created_at),
        updated_at=float(updated_at),
        owner=owner,
    )
