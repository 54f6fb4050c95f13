"""Parsing and validating what a client sends: classify bodies (JSON or multipart), labels, templates.

Each problem raises a typed error with its own code, so a client can tell them apart.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from server.errors import BadRequest, InvalidInput
from server.schemas import ClassifyRequest
from server.settings import Settings
from server.templates import PLACEHOLDER, TEMPLATE_SETS

_LABEL_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FORM_FIELDS = {"image", "labels", "label_set", "templates", "top_k", "method", "options", "seed", "compare",
                "abstain_below", "confidence_gate"}


@dataclass
class ClassifyInput:
    """A classify request after parsing: images still encoded (decoded off the event loop)."""

    images: list[bytes | str]  # raw bytes (multipart) or base64 / data: URI strings (JSON)
    request: ClassifyRequest  # the other fields; its ``images`` is a placeholder for multipart


def validate_labels(labels: list[str] | None, settings: Settings, where: str = "labels") -> tuple[str, ...]:
    if not labels:
        raise InvalidInput(f"{where} is empty: give at least one label, or a label_set", code="no_labels")
    if len(labels) > settings.max_labels:
        raise InvalidInput(
            f"{len(labels)} labels; the limit is {settings.max_labels} (TTA_MAX_LABELS)", code="too_many_labels"
        )
    cleaned = []
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise InvalidInput(f"{where}[{i}] is empty", code="empty_label")
        label = " ".join(label.split())
        if len(label) > settings.max_label_chars:
            raise InvalidInput(
                f"{where}[{i}] has {len(label)} characters; the limit is {settings.max_label_chars}",
                code="label_too_long",
            )
        cleaned.append(label)
    seen: dict[str, int] = {}
    for i, label in enumerate(cleaned):
        if label in seen:
            raise InvalidInput(
                f"{where}[{i}] {label!r} repeats {where}[{seen[label]}]; labels must be unique",
                code="duplicate_labels",
            )
        seen[label] = i
    return tuple(cleaned)


def resolve_templates(value: list[str] | str | None, settings: Settings,
                      fallback: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """A named set or an explicit list to a tuple of templates; None falls back, then to the server default."""
    if value is None:
        if fallback is not None:
            return fallback
        value = settings.default_templates
    if isinstance(value, str):
        if value not in TEMPLATE_SETS:
            raise InvalidInput(
                f"unknown template set {value!r}; named sets are {', '.join(sorted(TEMPLATE_SETS))}, "
                "or pass a list of templates containing {}",
                code="unknown_template_set",
            )
        return TEMPLATE_SETS[value]
    if not value:
        raise InvalidInput("templates is an empty list", code="invalid_templates")
    if len(value) > settings.max_templates:
        raise InvalidInput(
            f"{len(value)} templates; the limit is {settings.max_templates} (TTA_MAX_TEMPLATES)",
            code="too_many_templates",
        )
    for i, template in enumerate(value):
        if PLACEHOLDER not in template:
            raise InvalidInput(f"templates[{i}] {template!r} has no {{}} where the label goes",
                               code="invalid_templates")
    return tuple(value)


def validate_label_set_name(name: str) -> str:
    if not _LABEL_SET_NAME.match(name):
        raise InvalidInput(
            f"label set name {name!r} is invalid: 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            code="invalid_name",
        )
    return name


def validate_descriptions(descriptions: dict[str, list[str]] | None,
                          labels: tuple[str, ...]) -> dict[str, list[str]] | None:
    if descriptions is None:
        return None
    unknown = [k for k in descriptions if k not in labels]
    if unknown:
        raise InvalidInput(f"descriptions name labels not in the set: {', '.join(map(repr, unknown[:5]))}",
                           code="invalid_descriptions")
    for key, items in descriptions.items():
        if any(not d.strip() for d in items):
            raise InvalidInput(f"descriptions[{key!r}] holds an empty description", code="invalid_descriptions")
    return descriptions


def check_image_count(n: int, settings: Settings) -> None:
    if n == 0:
        raise InvalidInput("no images: send at least one", code="no_images")
    if n > settings.max_images_per_request:
        raise InvalidInput(
            f"{n} images; the limit is {settings.max_images_per_request} per request (TTA_MAX_IMAGES_PER_REQUEST)",
            code="too_many_images",
        )


def parse_json_body(body: bytes) -> ClassifyInput:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise BadRequest("the JSON body must be an object", code="invalid_json")
    if isinstance(data.get("images"), list) and not data["images"]:
        raise InvalidInput("no images: send at least one", code="no_images")
    request = _validated(data)
    return ClassifyInput(images=list(request.images), request=request)


def _json_list_or_values(values: list[str], field: str) -> list[str]:
    """A repeated form field, or one field holding a JSON list."""
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except ValueError as exc:
            raise BadRequest(f"form field {field!r} looks like JSON but is not: {exc}", code="invalid_form") from exc
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise InvalidInput(f"form field {field!r} must be a JSON list of strings", code="invalid_form")
        return parsed
    return values


async def parse_form(form: FormData) -> ClassifyInput:
    unknown = sorted({k for k in form if k not in _FORM_FIELDS})
    if unknown:
        raise InvalidInput(
            f"unknown form field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(_FORM_FIELDS))}",
            code="invalid_form",
        )
    images: list[bytes | str] = []
    for item in form.getlist("image"):
        if not isinstance(item, UploadFile):
            raise InvalidInput("form field 'image' must be a file upload (curl -F image=@photo.jpg)",
                               code="invalid_form")
        images.append(await item.read())
    if not images:
        raise InvalidInput("no images: add one or more 'image' file fields", code="no_images")
    data: dict[str, Any] = {"images": ["<multipart>"]}
    texts = {k: [v for v in form.getlist(k) if isinstance(v, str)] for k in _FORM_FIELDS - {"image"}}
    if texts["labels"]:
        data["labels"] = _json_list_or_values(texts["labels"], "labels")
    for single in ("label_set", "method", "top_k", "seed", "compare", "abstain_below", "confidence_gate"):
        if len(texts[single]) > 1:
            raise InvalidInput(f"form field {single!r} given {len(texts[single])} times", code="invalid_form")
        if texts[single]:
            data[single] = texts[single][0]
    if texts["templates"]:
        values = texts["templates"]
        is_named = len(values) == 1 and not values[0].lstrip().startswith("[") and PLACEHOLDER not in values[0]
        data["templates"] = values[0] if is_named else _json_list_or_values(values, "templates")
    if texts["options"]:
        try:
            data["options"] = json.loads(texts["options"][0])
        except ValueError as exc:
            raise BadRequest(f"form field 'options' must be a JSON object: {exc}", code="invalid_form") from exc
    return ClassifyInput(images=images, request=_validated(data))


def _validated(data: dict[str, Any]) -> ClassifyRequest:
    try:
        return ClassifyRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidInput(f"{where}: {first.get('msg')}" if where else str(first.get("msg")),
                           code="validation_error") from exc
