"""The model card: ``ttaserve.json`` beside a local-dir model's weights, typed, read and written in one place.

It says what the server should know about a model that open_clip's config does not: whether it is the
demo model, a description, the label sets it ships (served read-only), and the calibration
temperatures fitted per method. Unknown keys (a training record, say) are kept as they are.

    {"demo": false, "description": "...",
     "label_sets": {"name": {"labels": [...], "templates": [...], "descriptions": {...}}},
     "calibration": {"zero_shot": {"temperature": 0.89, "ece_before": 2.2, "ece_after": 1.1, ...}}}
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


class CardCalibration(BaseModel):
    """One method's fitted temperature and how it was fitted."""

    model_config = ConfigDict(extra="allow")

    temperature: float = Field(gt=0)
    ece_before: float | None = None  # ECE %, before and after the temperature, on the fitting data
    ece_after: float | None = None
    images: int | None = None  # images it was fitted on
    data: str | None = None  # which data ("val": the demo's held-apart validation split)
    options: dict[str, Any] | None = None  # the method's options while fitting


class ModelCard(BaseModel):
    """What ``ttaserve.json`` holds; an absent file is an empty card (no label sets, every temperature 1)."""

    model_config = ConfigDict(extra="allow")

    demo: bool = False
    description: str | None = None
    label_sets: dict[str, CardLabelSet] = Field(default_factory=dict)
    calibration: dict[str, CardCalibration] = Field(default_factory=dict)


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
