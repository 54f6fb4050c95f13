"""Reading a classify request off HTTP: a JSON or multipart body, and the ``X-Request-Timeout`` header,
turned into the service's ``ClassifyRequest``. Each problem raises a typed error with its own code.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.schemas import ClassifyRequest as ClassifyBody
from server.clip.templates import PLACEHOLDER
from server.errors import BadRequest, InvalidInput, UnsupportedMediaType
from server.service.classify import ClassifyRequest
from server.service.decoding import ImageInput
from server.settings import Settings

TIMEOUT_HEADER = "X-Request-Timeout"
_FORM_FIELDS = {
    "image",
    "labels",
    "label_set",
    "templates",
    "top_k",
    "method",
    "options",
    "seed",
    "compare",
    "abstain_below",
    "confidence_gate",
}


async def read_classify(request: Request, settings: Settings) -> ClassifyRequest:
    """The request's body (JSON with base64 images, or multipart with image files) and deadline header."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(
                max_files=settings.max_images_per_request + 1,
                max_fields=settings.max_labels + settings.max_templates + 16,
                max_part_size=settings.max_body_bytes,
            )
        except StarletteHTTPException as exc:
            raise BadRequest(f"malformed multipart body: {exc.detail}", code="invalid_form") from exc
        try:
            images, body = await parse_form(form)
        finally:
            await form.close()
    elif ctype in ("application/json", ""):
        images, body = parse_json_body(await request.body())
    else:
        raise UnsupportedMediaType(
            f"content type {ctype!r} is not accepted; send application/json or multipart/form-data",
        )
    return ClassifyRequest(
        images=images,
        labels=body.labels,
        label_set=body.label_set,
        templates=body.templates,
        top_k=body.top_k,
        method=body.method,
        options=body.options,
        seed=body.seed,
        compare=body.compare,
        abstain_below=body.abstain_below,
        confidence_gate=body.confidence_gate,
        timeout_s=read_timeout(request.headers.get(TIMEOUT_HEADER)),
    )


def read_timeout(raw: str | None) -> float | None:
    """``X-Request-Timeout`` in seconds (the service keeps the shorter of it and the server's), or None."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise BadRequest(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {raw!r}", code="invalid_timeout")
    return value


def parse_json_body(body: bytes) -> tuple[list[ImageInput], ClassifyBody]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise BadRequest("the JSON body must be an object", code="invalid_json")
    if isinstance(data.get("images"), list) and not data["images"]:
        raise InvalidInput("no images: send at least one", code="no_images")
    request = _validated(data)
    return list(request.images), request


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


async def parse_form(form: FormData) -> tuple[list[ImageInput], ClassifyBody]:
    unknown = sorted({k for k in form if k not in _FORM_FIELDS})
    if unknown:
        raise InvalidInput(
            f"unknown form field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(_FORM_FIELDS))}",
            code="invalid_form",
        )
    images: list[ImageInput] = []
    for item in form.getlist("image"):
        if not isinstance(item, UploadFile):
            raise InvalidInput(
                "form field 'image' must be a file upload (curl -F image=@photo.jpg)", code="invalid_form"
            )
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
    return images, _validated(data)


def _validated(data: dict[str, Any]) -> ClassifyBody:
    try:
        return ClassifyBody.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidInput(
            f"{where}: {first.get('msg')}" if where else str(first.get("msg")), code="validation_error"
        ) from exc
