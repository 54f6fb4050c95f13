"""What the server keeps on purpose, and the protocol every store implements.

Label sets and the calibrations fitted on their labelled images, few-shot adapters (versioned artifacts)
and the jobs that train them, and online sessions' state, each kept for an owner (a tenant: the name of an
API key). Everything goes through the one protocol, so a deployment can move from the embedded SQLite file to a
shared database without the service layer noticing. Every write is durable when the call returns, and an
adapter's record and its artifact bytes are written in one transaction: nothing half-written is served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.errors import Conflict, NotFound


def label_set_exists(name: str) -> Conflict:
    """What every store raises when a label set's name is taken (for its owner)."""
    return Conflict(f"label set {name!r} already exists; DELETE it first to replace it", code="label_set_exists")


def no_label_set(name: str, hint: str = "") -> NotFound:
    """What every store raises for a label set it does not hold (for that owner)."""
    return NotFound(f"no label set named {name!r}{hint}", code="unknown_label_set")


LIST_HINT = "; GET /v1/label-sets lists them"


def no_adapter(name: str, version: int | None = None) -> NotFound:
    """What every store raises for an adapter (or a version of it) it does not hold for that owner."""
    which = f"{name}@v{version}" if version is not None else name
    return NotFound(f"no adapter named {which!r}; GET /v1/adapters lists them", code="unknown_adapter")


def no_job(job_id: str) -> NotFound:
    return NotFound(f"no job {job_id!r}; GET /v1/jobs lists them", code="unknown_job")


@dataclass(frozen=True)
class LabelSet:
    """A named set of labels, with default templates and per-label descriptions."""

    name: str
    labels: tuple[str, ...]
    templates: tuple[str, ...] | None = None
    descriptions: dict[str, list[str]] | None = None
    created_at: float = field(default_factory=time.time)
    source: str = "user"  # "user" (stored) or "model" (shipped with the model, read-only)
    owner: str = ""  # the name of the API key that stored it ('' without keys); shipped sets have none


@dataclass(frozen=True)
class CalibrationRecord:
    """A confidence model fitted on a user's labelled images, for one label set and one method.

    It holds for the label set and the model it was fitted with: ``label_set_fingerprint`` and
    ``model_fingerprint`` say which; a record whose fingerprints no longer match is not applied.
    """

    label_set: str
    method: str
    label_set_fingerprint: str
    model_fingerprint: str
    model: dict[str, Any]  # the ConfidenceModel's to_dict()
    report: dict[str, Any]  # images, held-out ECE before and after
    created_at: float = field(default_factory=time.time)
    owner: str = ""  # the owner of the label set


@dataclass(frozen=True)
class AdapterRecord:
    """One version of a stored adapter; its artifact bytes are read apart (``Store.adapter_bytes``)."""

    name: str
    version: int  # 1, 2, ...: given by the store, one more than the name's newest
    card: dict[str, Any]  # the artifact's card (``adapters.fewshot.artifact.AdapterCard``), as JSON
    sha256: str  # of the artifact bytes
    nbytes: int  # of the artifact bytes
    group: str | None = None  # the adapter group it belongs to (merging), if any
    source: str = "upload"  # "upload", "job:<id>" or "merge:<group>"
    created_at: float = field(default_factory=time.time)
    owner: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"


JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_FINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class JobRecord:
    """A long job (few-shot training) as the store keeps it: what it was asked, where it is, what it made."""

    id: str
    kind: str  # "finetune"
    state: str  # one of JOB_STATES
    spec: dict[str, Any]  # the request, without its images
    progress: dict[str, Any] = field(default_factory=dict)  # step, steps, loss, elapsed_s, eta_s
    result: dict[str, Any] | None = None  # what it made (the adapter's name and version)
    error: str | None = None  # why it failed
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    owner: str = ""


class Store(Protocol):
    """Durable state. Raises ``server.errors.Conflict`` for a name taken, ``NotFound`` for one missing.

    Everything kept belongs to an ``owner`` (a tenant: the name of the API key that stored it, '' without
    keys); names are unique per owner, and every lookup by name sees the owner's rows only.
    """

    def create_label_set(self, label_set: LabelSet) -> LabelSet:
        """Keep ``label_set`` for ``label_set.owner``."""
        ...

    def get_label_set(self, name: str, owner: str = "") -> LabelSet: ...

    def list_label_sets(self, owner: str = "") -> list[LabelSet]: ...

    def delete_label_set(self, name: str, owner: str = "") -> None:
        """Delete a label set and everything kept for it (its calibrations)."""
        ...

    def save_calibration(self, record: CalibrationRecord) -> None:
        """Keep ``record``, replacing the owner's earlier one for the same label set and method."""
        ...

    def calibrations(self, label_set: str | None = None, owner: str = "") -> list[CalibrationRecord]:
        """The calibrations ``owner`` keeps for ``label_set`` (every owner's, of all label sets: None)."""
        ...

    def delete_calibrations(self, label_set: str, owner: str = "") -> None:
        """Delete the calibrations ``owner`` keeps for ``label_set``."""
        ...

    def add_adapter(self, record: AdapterRecord, data: bytes) -> AdapterRecord:
        """Keep ``data`` as the next version of ``record.name`` for ``record.owner`` (``record.version`` is
        ignored); return the record as stored, with its version."""
        ...

    def adapter(self, name: str, version: int | None = None, owner: str = "") -> AdapterRecord:
        """A version of an adapter (the newest: None)."""
        ...

    def adapter_bytes(self, name: str, version: int, owner: str = "") -> bytes: ...

    def list_adapters(self, owner: str = "") -> list[AdapterRecord]:
        """Every version of every adapter ``owner`` keeps, by name then version."""
        ...

    def delete_adapter(self, name: str, version: int | None = None, owner: str = "") -> int:
        """Delete one version (every version: None); return how many were deleted, raise NotFound for none."""
        ...

    def create_job(self, job: JobRecord, inputs: bytes) -> JobRecord:
        """Keep a new job with its inputs (the images it trains on, serialized)."""
        ...

    def update_job(self, job_id: str, **changes: Any) -> JobRecord:
        """Change a job's ``state``, ``progress``, ``result`` or ``error`` (``updated_at`` follows). A job that
        ends (``JOB_FINAL``) drops its inputs: its images are kept no longer than they are needed."""
        ...

    def job(self, job_id: str, owner: str | None = "") -> JobRecord:
        """A job of ``owner`` (of any owner: None, for the worker)."""
        ...

    def job_inputs(self, job_id: str) -> bytes: ...

    def list_jobs(self, owner: str | None = "", states: tuple[str, ...] | None = None) -> list[JobRecord]:
        """Jobs of ``owner`` (every owner's: None), in ``states`` if given, oldest first."""
        ...

    def save_session(self, owner: str, session_id: str, data: bytes, last_used: float) -> None:
        """Keep a session's state (serialized), replacing what was kept for it."""
        ...

    def load_session(self, owner: str, session_id: str) -> tuple[bytes, float] | None:
        """A session's state and when it was last used; None when none is kept."""
        ...

    def delete_session(self, owner: str, session_id: str) -> bool:
        """Forget a session; whether one was kept."""
        ...

    def delete_sessions_unused_since(self, when: float) -> int:
        """Forget every owner's sessions last used before ``when``; how many."""
        ...

    def close(self) -> None: ...
