"""Label sets: named labels with default templates and descriptions, stored durably or shipped by the model.

The model's own sets (from its card) are served read-only beside the stored ones, to every owner; a
stored set cannot take a shipped set's name. A stored set belongs to its ``owner`` (the name of the API
key that created it, '' without keys): another owner's set is answered as absent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence

from server.clip.card import ModelCard
from server.errors import Conflict
from server.service.validation import (
    resolve_templates,
    validate_descriptions,
    validate_label_set_name,
    validate_labels,
)
from server.settings import Settings
from server.storage import LabelSet, Store


def fingerprint(label_set: LabelSet) -> str:
    """A digest of what a label set is: its labels, templates, descriptions and creation. A set deleted and
    created again under the same name has another; what was fitted for the old one no longer applies."""
    what = [label_set.name, list(label_set.labels), label_set.templates, label_set.descriptions, label_set.created_at]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def shipped_label_sets(card: ModelCard, settings: Settings) -> dict[str, LabelSet]:
    """The label sets a model's card ships, checked like a client's."""
    out = {}
    for name, entry in card.label_sets.items():
        labels = validate_labels(entry.labels, settings, where=f"label_sets.{name}.labels")
        templates = tuple(entry.templates) if entry.templates else None
        out[name] = LabelSet(name, labels, templates, entry.descriptions, created_at=0.0, source="model")
    return out


class LabelSets:
    """Creating, reading and deleting label sets; the model's are read-only."""

    def __init__(self, store: Store, shipped: dict[str, LabelSet], settings: Settings):
        self.store = store
        self.shipped = shipped
        self.settings = settings
        self.on_delete: list[Callable[[LabelSet], None]] = []  # told of a deleted label set: state kept for it goes

    def create(
        self,
        name: str,
        labels: Sequence[str],
        templates: Sequence[str] | str | None = None,
        descriptions: Mapping[str, list[str]] | None = None,
        *,
        owner: str = "",
    ) -> LabelSet:
        name = validate_label_set_name(name)
        checked = validate_labels(labels, self.settings)
        resolved = resolve_templates(templates, self.settings) if templates is not None else None
        described = validate_descriptions(descriptions, checked, self.settings)
        if name in self.shipped:
            raise Conflict(
                f"label set {name!r} is provided by the model and cannot be replaced", code="label_set_exists"
            )
        return self.store.create_label_set(LabelSet(name, checked, resolved, described, owner=owner))

    def get(self, name: str, *, owner: str = "") -> LabelSet:
        """The shipped set ``name``, else ``owner``'s; NotFound for another owner's."""
        if name in self.shipped:
            return self.shipped[name]
        return self.store.get_label_set(name, owner)

    def list(self, *, owner: str = "") -> list[LabelSet]:
        return sorted(self.shipped.values(), key=lambda s: s.name) + self.store.list_label_sets(owner)

    def delete(self, name: str, *, owner: str = "") -> None:
        if name in self.shipped:
            raise Conflict(
                f"label set {name!r} is provided by the model and cannot be deleted", code="label_set_builtin"
            )
        label_set = self.store.get_label_set(name, owner)
        self.store.delete_label_set(name, owner)
        for forget in self.on_delete:
            forget(label_set)
