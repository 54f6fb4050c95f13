"""What the OpenAPI document says beyond what FastAPI infers: error answers, and classify's two body forms."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server.api.schemas import CalibrationIn, ClassifyRequest, ErrorBody

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Malformed JSON or multipart body.",
        401: "No API key, or an unknown one (when keys are configured); see WWW-Authenticate.",
        403: "The API key may not do this: changing state takes an admin key.",
        404: "Unknown label set.",
        413: "Body larger than TTA_MAX_BODY_BYTES.",
        415: "Neither application/json nor multipart/form-data.",
        422: "Invalid input: each problem has its own error code.",
        429: "Queue full, or the key over its rate limit; retry after the Retry-After header's seconds.",
        503: "The model is still loading.",
        504: "The request did not finish within its deadline (TTA_REQUEST_TIMEOUT_S or X-Request-Timeout).",
    }.items()
}

MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "One or more image files (repeat the field).",
        },
        "labels": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Repeat the field, or send one JSON list.",
        },
        "label_set": {"type": "string"},
        "templates": {"type": "string", "description": "A named set, or a JSON list of templates."},
        "top_k": {"type": "integer", "minimum": 1},
        "method": {"type": "string"},
        "options": {"type": "string", "description": "The method's options as a JSON object."},
    },
}

CLASSIFY_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ClassifyRequest"},
                "examples": {
                    "labels": {
                        "summary": "Labels inline",
                        "value": {
                            "images": ["<base64 PNG or data:image/png;base64,...>"],
                            "labels": ["red star", "blue circle", "green square"],
                            "top_k": 2,
                        },
                    },
                    "label_set": {
                        "summary": "A registered label set",
                        "value": {"images": ["<base64>"], "label_set": "demo-shapes", "templates": "simple"},
                    },
                },
            },
            "multipart/form-data": {
                "schema": MULTIPART_SCHEMA,
                "encoding": {"image": {"contentType": "image/*"}},
            },
        },
    }
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of these statuses."""
    return {status: ERRORS[status] for status in statuses}


def document_classify_body(app: FastAPI) -> None:
    """Add the bodies the routes read by hand (JSON or multipart) to the OpenAPI components: ClassifyRequest
    and CalibrationIn."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for body in (ClassifyRequest, CalibrationIn):
                components[body.__name__] = body.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend its schema
