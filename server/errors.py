"""Typed errors and the one place they become HTTP responses.

Every error the API returns has the shape ``{"error": {"code", "message", "request_id"}}``. Code that
detects a problem raises one of the classes below; ``install_handlers`` maps them (and FastAPI's own
validation errors) to status codes, logs them with the request id, and counts rejections.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ttaserve.errors")


class TTAError(Exception):
    """Base of every error the API reports; ``code`` is stable, ``message`` is for people."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}


class BadRequest(TTAError):
    """The body cannot be parsed at all (malformed JSON or multipart)."""

    status = 400
    code = "bad_request"


class InvalidInput(TTAError):
    """The body parses but a value is unacceptable (a bad image, an empty label, ...)."""

    status = 422
    code = "invalid_input"


class NotFound(TTAError):
    status = 404
    code = "not_found"


class Conflict(TTAError):
    status = 409
    code = "conflict"


class PayloadTooLarge(TTAError):
    status = 413
    code = "body_too_large"


class UnsupportedMediaType(TTAError):
    status = 415
    code = "unsupported_media_type"


class Overloaded(TTAError):
    """The engine's queue is full; the client should retry after ``Retry-After`` seconds."""

    status = 429
    code = "overloaded"


class NotReady(TTAError):
    status = 503
    code = "not_ready"


class DeadlineExceeded(TTAError):
    status = 504
    code = "timeout"


class ClientClosed(TTAError):
    """The client went away before its answer was ready; nginx's 499, which nobody will read."""

    status = 499
    code = "client_closed_request"


class ConfigError(Exception):
    """The server cannot start with this configuration; the message names the setting to change."""


def error_body(code: str, message: str, request_id: str | None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _respond(request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None):
    rid = request_id_of(request)
    level = logging.ERROR if status >= 500 and status not in (503, 504) else logging.INFO
    log.log(level, "%s %s -> %d %s: %s", request.method, request.url.path, status, code, message)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None and status in (413, 429, 503, 504):
        metrics.rejected.labels(reason=code).inc()
    headers = dict(headers or {})
    if rid:
        # Set here too: the generic 500 handler runs outside the middleware that echoes the id.
        headers["X-Request-ID"] = rid
    return JSONResponse(error_body(code, message, rid), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    """Register the mapping from exceptions to the shared error shape."""

    @app.exception_handler(TTAError)
    async def _tta_error(request: Request, exc: TTAError) -> JSONResponse:
        return _respond(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _respond(request, 422, "validation_error", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _respond(request, exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _respond(request, 500, "internal_error", "internal server error; see the server log")
