"""What the server keeps on purpose, and the protocol every store implements.

Today: label sets. Later state (calibrations, adapters, jobs, sessions, API keys) goes through the same
protocol, so a deployment can move from the embedded SQLite file to a shared database without the
service layer noticing. Every write is durable when the call returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class LabelSet:
    """A named set of labels, with default templates and per-label descriptions."""

    name: str
    labels: tuple[str, ...]
    templates: tuple[str, ...] | None = None
    descriptions: dict[str, list[str]] | None = None
    created_at: float = field(default_factory=time.time)
    source: str = "user"  # "user" (stored) or "model" (shipped with the model, read-only)


class Store(Protocol):
    """Durable state. Raises ``server.errors.Conflict`` for a name taken, ``NotFound`` for one missing."""

    def create_label_set(self, label_set: LabelSet) -> LabelSet: ...

    def get_label_set(self, name: str) -> LabelSet: ...

    def list_label_sets(self) -> list[LabelSet]: ...

    def delete_label_set(self, name: str) -> None: ...

    def close(self) -> None: ...
