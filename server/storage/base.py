"""What the server keeps on purpose, and the protocol every store implements.

Today: label sets and the calibrations fitted on their labelled images. Later state (adapters, jobs,
sessions, API keys) goes through the same protocol, so a deployment can move from the embedded SQLite
file to a shared database without the service layer noticing. Every write is durable when the call
returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class LabelSet:
    """A named set of labels, with default templates and per-label descriptions."""

    name: str
    labels: tuple[str, ...]
    templates: tuple[str, ...] | None = None
    descriptions: dict[str, list[str]] | None = None
    created_at: float = field(default_factory=time.time)
    source: str = "user"  # "user" (stored) or "model" (shipped with the model, read-only)


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


class Store(Protocol):
    """Durable state. Raises ``server.errors.Conflict`` for a name taken, ``NotFound`` for one missing."""

    def create_label_set(self, label_set: LabelSet) -> LabelSet: ...

    def get_label_set(self, name: str) -> LabelSet: ...

    def list_label_sets(self) -> list[LabelSet]: ...

    def delete_label_set(self, name: str) -> None:
        """Delete a label set and everything kept for it (its calibrations)."""
        ...

    def save_calibration(self, record: CalibrationRecord) -> None:
        """Keep ``record``, replacing the label set's earlier one for the same method."""
        ...

    def calibrations(self, label_set: str | None = None) -> list[CalibrationRecord]:
        """The calibrations kept for ``label_set`` (all label sets: None)."""
        ...

    def delete_calibrations(self, label_set: str) -> None:
        """Delete the calibrations kept for ``label_set``."""
        ...

    def close(self) -> None: ...
