"""What the server keeps on purpose, and the protocol every store implements.

Today: label sets and the calibrations fitted on their labelled images, each kept for an owner (a tenant:
the name of an API key). Later state (adapters, jobs, sessions) goes through the same protocol, so a
deployment can move from the embedded SQLite file to a shared database without the service layer
noticing. Every write is durable when the call returns.
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

    def close(self) -> None: ...
