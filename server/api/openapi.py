"""What the OpenAPI document says beyond what FastAPI infers, so a client generator or a fuzzer can trust it.

- The bodies the routes read by hand (classify and calibration: JSON or multipart), with examples that work
  as they are: the images of ``docs/examples`` inlined as base64.
- The server's limits (``TTA_MAX_TOP_K``, ``TTA_MAX_LABELS``, ...) as bounds of the request schemas, so a
  request the schema allows is not refused for its size. Pydantic does not enforce them: the service does,
  with its own error codes.
- The one error shape ``{"error": {...}}`` on every error answer (FastAPI's ``{"detail"}`` never appears).
- The headers: ``X-Request-ID`` on every request and answer, ``X-Request-Timeout`` on classify,
  ``Retry-After`` on 429 and 503, ``Location`` on a started calibration.
- Readable operation ids (``classify``, ``listLabelSets``): a generated client's function names.
"""

from __future__ import annotations

import copy
import re
from itertools import islice
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from server.api.examples import BLUE_SQUARE_PNG, GREEN_CIRCLE_PNG, RED_STAR_PNG
from server.api.schemas import CalibrationIn, ClassifyRequest, ErrorBody
from server.clip.templates import PLACEHOLDER, TEMPLATE_SETS
from server.service.recalibration import MIN_IMAGES
from server.settings import Settings

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Malformed JSON or multipart body, or a bad X-Request-Timeout.",
        401: "No API key, or an unknown one (when keys are configured); see WWW-Authenticate.",
        403: "The API key may not do this: changing state takes an admin key.",
        404: "Unknown label set.",
        413: "Body larger than TTA_MAX_BODY_BYTES.",
        415: "Neither application/json nor multipart/form-data.",
        422: "Invalid input: each problem has its own error code.",
        429: "Queue full, or the key over its rate limit; retry after the Retry-After header's seconds.",
        503: "The model is still loading, or the server is draining; retry after the Retry-After header's seconds.",
        504: "The request did not finish within its deadline (TTA_REQUEST_TIMEOUT_S or X-Request-Timeout).",
    }.items()
}

REQUEST_ID = "X-Request-ID"
REQUEST_ID_PARAMETER = {
    "name": REQUEST_ID,
    "in": "header",
    "required": False,
    "description": "Your id for this request (1-128 printable ASCII characters, no spaces): echoed in the answer, "
    "its errors and the server's log. Without one (or with an invalid one) the server makes one up.",
    "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,128}$"},
}
REQUEST_ID_HEADER = {
    "description": "The request's id: the X-Request-ID sent, or one the server made up.",
    "required": True,
    "schema": {"type": "string"},
}
RETRY_AFTER_HEADER = {
    "description": "Seconds after which the same request may succeed.",
    "required": False,
    "schema": {"type": "integer", "minimum": 0},
}
TIMEOUT_PARAMETER = {
    "name": "X-Request-Timeout",
    "in": "header",
    "required": False,
    "description": "This request's deadline in seconds; the server keeps the shorter of it and "
    "TTA_REQUEST_TIMEOUT_S. Past it the answer is 504.",
    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 1e9},
}

MULTIPART_CLASSIFY = {
    "type": "object",
    "description": "Images (image), or one video: its frames (frame) or a video file (video).",
    "properties": {
        "image": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "One or more image files (repeat the field).",
        },
        "frame": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "A video's frames as image files, in time order (repeat the field); one result.",
        },
        "video": {"type": "string", "format": "binary", "description": "A video file (needs PyAV on the server)."},
        "num_frames": {"type": "integer", "minimum": 1, "description": "Frames to sample from the video (default 8)."},
        "sampling": {"type": "string", "enum": ["segment", "uniform", "all"], "description": "How frames are sampled."},
        "pooling": {"type": "string", "enum": ["mean", "max"], "description": "How the frames are pooled."},
        "labels": {"type": "array", "items": {"type": "string"}, "description": "Repeat the field, or one JSON list."},
        "label_set": {"type": "string", "description": "Name of a registered label set, instead of labels."},
        "templates": {"type": "string", "description": "A named set, or a JSON list of templates with {}."},
        "top_k": {"type": "integer", "minimum": 1, "description": "Predictions returned per image."},
        "method": {"type": "string", "description": "Test-time method; GET /v1/methods lists them."},
        "options": {"type": "string", "description": "The method's options as a JSON object."},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "description": "Seeds the augmented views."},
        "compare": {"type": "boolean", "description": "Also return the zero-shot predictions."},
        "abstain_below": {"type": "number", "minimum": 0, "maximum": 1, "description": "Abstain below this."},
        "confidence_gate": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "Do not adapt an image whose calibrated zero-shot margin is at least this.",
        },
        "session": {
            "type": "string",
            "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
            "description": "Keep online state across your requests with this id (zero_shot only).",
        },
        "session_method": {"type": "string", "description": "The session's online method: tda or stats."},
        "adapter": {
            "type": "string",
            "description": 'A stored adapter, NAME or NAME@vN, or routing as a JSON object {"route": "auto", ...}.',
        },
        "adapter_alpha": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "How far from the frozen model toward the adapter (0: exactly zero-shot).",
        },
    },
}

MULTIPART_CALIBRATION = {
    "type": "object",
    "required": ["image", "labels"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "labels": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Each image's label, in order (repeat, or one JSON list).",
        },
        "methods": {"type": "array", "items": {"type": "string"}},
    },
}

EXAMPLE_LABELS = ["red star", "blue square", "green circle"]
_CALIBRATION_PAIRS = [(RED_STAR_PNG, "red star"), (BLUE_SQUARE_PNG, "blue square"), (GREEN_CIRCLE_PNG, "green circle")]
_CALIBRATION_EXAMPLE = list(islice((p for _ in range(MIN_IMAGES) for p in _CALIBRATION_PAIRS), MIN_IMAGES))

CLASSIFY_OPENAPI = {
    "parameters": [TIMEOUT_PARAMETER],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ClassifyRequest"},
                "examples": {
                    "labels": {
                        "summary": "Labels inline (docs/examples/red_star.png)",
                        "value": {"images": [RED_STAR_PNG], "labels": EXAMPLE_LABELS, "top_k": 2},
                    },
                    "video": {
                        "summary": "A video as its frames, their embeddings mean-pooled into one result",
                        "value": {
                            "video": {"frames": [RED_STAR_PNG, RED_STAR_PNG], "sampling": "all", "pooling": "mean"},
                            "labels": EXAMPLE_LABELS,
                        },
                    },
                    "label_set": {
                        "summary": "A label set of the demo model, adapted with TPS",
                        "value": {
                            "images": [f"data:image/png;base64,{GREEN_CIRCLE_PNG}"],
                            "label_set": "demo-shapes",
                            "method": "tps",
                            "seed": 0,
                        },
                    },
                    "session": {
                        "summary": "Zero-shot answers that adapt across a session's requests",
                        "value": {"images": [BLUE_SQUARE_PNG], "label_set": "demo-shapes", "session": "camera-7"},
                    },
                },
            },
            "multipart/form-data": {
                "schema": MULTIPART_CLASSIFY,
                "encoding": {
                    "image": {"contentType": "image/*"},
                    "frame": {"contentType": "image/*"},
                    "video": {"contentType": "video/*"},
                },
            },
        },
    },
}

CALIBRATION_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/CalibrationIn"},
                "examples": {
                    "demo": {
                        "summary": f"{MIN_IMAGES} labelled images of the demo model's demo-shapes",
                        "value": {
                            "images": [image for image, _ in _CALIBRATION_EXAMPLE],
                            "labels": [label for _, label in _CALIBRATION_EXAMPLE],
                            "methods": ["zero_shot"],
                        },
                    }
                },
            },
            "multipart/form-data": {
                "schema": MULTIPART_CALIBRATION,
                "encoding": {"image": {"contentType": "image/*"}},
            },
        },
    },
    "responses": {
        "202": {
            "headers": {
                "Location": {"description": "Where to follow the fit (GET).", "schema": {"type": "string"}},
            }
        }
    },
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of these statuses."""
    return {status: ERRORS[status] for status in statuses}


def operation_id(route: APIRoute) -> str:
    """The handler's name in camelCase: ``list_label_sets`` -> ``listLabelSets``."""
    head, *rest = route.name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Build the app's OpenAPI document once, as FastAPI infers it plus what this module adds."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            # A copy: the module's constants (bodies, headers) stay as they are for the next app's settings.
            schema = copy.deepcopy(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    summary=app.summary,
                    description=app.description,
                    routes=app.routes,
                )
            )
            one_error_shape(schema)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for body in (ClassifyRequest, CalibrationIn):
                generated = body.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(generated.pop("$defs", {}))  # nested bodies (VideoIn) as components of their own
                components[body.__name__] = generated
            bound_by_settings(schema, settings)
            document_headers(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend its schema


def _branch(prop: dict[str, Any], kind: str) -> dict[str, Any]:
    """The schema of ``prop`` for values of JSON type ``kind``: itself, or its ``anyOf`` branch of that type."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == kind:
            return option  # type: ignore[no-any-return]
    raise KeyError(kind)


def _labels(prop: dict[str, Any], settings: Settings) -> None:
    # Unique, and each with something besides spaces: the server refuses the rest (its checks are stricter:
    # labels that differ only in spacing repeat each other).
    _branch(prop, "array").update(minItems=1, maxItems=settings.max_labels, uniqueItems=True)
    _branch(prop, "array")["items"].update(maxLength=settings.max_label_chars, pattern=r"\S")


def _templates(prop: dict[str, Any], settings: Settings) -> None:
    _branch(prop, "string")["enum"] = sorted(TEMPLATE_SETS)
    _branch(prop, "array").update(minItems=1, maxItems=settings.max_templates)
    _branch(prop, "array")["items"]["pattern"] = re.escape(PLACEHOLDER)


def bound_by_settings(schema: dict[str, Any], settings: Settings) -> None:
    """Write the server's limits into the request schemas: what the schema allows, the server accepts."""
    components = schema["components"]["schemas"]
    classify = components["ClassifyRequest"]["properties"]
    _branch(classify["images"], "array")["maxItems"] = settings.max_images_per_request
    video = components["VideoIn"]["properties"]
    _branch(video["frames"], "array")["maxItems"] = settings.max_frames
    _branch(video["num_frames"], "integer")["maximum"] = settings.max_frames
    _labels(classify["labels"], settings)
    _templates(classify["templates"], settings)
    _branch(classify["top_k"], "integer")["maximum"] = settings.max_top_k

    form = schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = form["properties"]
    form["image"].update(minItems=1, maxItems=settings.max_images_per_request)
    form["frame"].update(minItems=1, maxItems=settings.max_frames)
    form["num_frames"]["maximum"] = settings.max_frames
    _labels(form["labels"], settings)
    form["top_k"]["maximum"] = settings.max_top_k

    label_set = components["LabelSetIn"]["properties"]
    label_set["name"]["pattern"] = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
    _labels(label_set["labels"], settings)
    _templates(label_set["templates"], settings)

    calibration = components["CalibrationIn"]["properties"]
    calibration["images"].update(minItems=MIN_IMAGES, maxItems=settings.max_calibration_images)
    calibration["labels"].update(minItems=MIN_IMAGES, maxItems=settings.max_calibration_images)


def one_error_shape(schema: dict[str, Any]) -> None:
    """Replace the 422 FastAPI adds to routes with parameters (``{"detail": [...]}``, which this server never
    sends) with the error shape its validation handler answers."""
    validation = {"$ref": "#/components/schemas/HTTPValidationError"}
    for path in schema["paths"].values():
        for operation in path.values():
            response = operation["responses"].get("422")
            if response is not None and response["content"]["application/json"]["schema"] == validation:
                operation["responses"]["422"] = {
                    "description": ERRORS[422]["description"],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                }
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)


def document_headers(schema: dict[str, Any]) -> None:
    """``X-Request-ID`` on every operation and answer; ``Retry-After`` on the refusals that send it."""
    for path in schema["paths"].values():
        for operation in path.values():
            operation.setdefault("parameters", []).append(REQUEST_ID_PARAMETER)
            for status, response in operation["responses"].items():
                headers = response.setdefault("headers", {})
                headers[REQUEST_ID] = REQUEST_ID_HEADER
                if status in ("429", "503"):
                    headers["Retry-After"] = RETRY_AFTER_HEADER
