"""The model card: ``ttaserve.json`` beside a local-dir model's weights, typed, read and written in one place.

It says what the server should know about a model that open_clip's config does not: whether it is the
demo model, a description, the label sets it ships (served read-only), and optionally the model's own
confidence model (``server.service.confidence.ConfidenceModel``, fitted on its labelled images by
``benchmarks/assets/calibrate.py --write``), used instead of the shipped label-free default. Unknown
keys (a training record, per-method temperatures of older versions) are kept as they are.

    {"demo": false, "description": "...",
     "label_sets": {"name": {"labels": [...], "templates": [...], "descriptions": {...}}},
     "confidence": {"features": [...], "intercept": ..., "weights": [...], ...}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import ConfigError

CARD_FILE = "ttaserve.json"


class CardLabelSet(BaseModel):
    """A label set a model ships."""

    model_config = ConfigDict(extra="forbid")

    labels: list[str]
    templates: list[str] | None = None
    descriptions: dict[str, list[str]] | None = None


class ModelCard(BaseModel):
    """What ``ttaserve.json`` holds; an absent file is an empty card (no label sets, the default confidence)."""

    model_config = ConfigDict(extra="allow")

    demo: bool = False
    description: str | None = None
    label_sets: dict[str, CardLabelSet] = Field(default_factory=dict)
    confidence: dict[str, Any] | None = None  # a ConfidenceModel's to_dict()


def read_card(folder: Path) -> ModelCard:
    """The card in ``folder``, or an empty one; raises ConfigError naming the file when it is malformed."""
    path = folder / CARD_FILE
    if not path.is_file():
        return ModelCard()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ConfigError(f"{path}: {where}: {first.get('msg')}") from exc


def write_card(folder: Path, card: ModelCard) -> Path:
    """Write ``card`` to ``folder``'s ttaserve.json (unset fields left out), replacing it atomically."""
    path = folder / CARD_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card.model_dump(mode="json", exclude_none=True), indent=2) + "\n")
    tmp.replace(path)
    return path
