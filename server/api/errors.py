"""The one place errors become HTTP responses: each error class's status, and the shared error body.

Every error the API returns has the shape ``{"error": {"code", "message", "request_id"}}``; it is
logged with the request id, and refusals (413, 429, 503, 504) are counted in ``tta_rejected_total``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server.errors import (
    BadRequest,
    ClientClosed,
    Conflict,
    DeadlineExceeded,
    Forbidden,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    StorageFull,
    StorageReadOnly,
    StorageUnavailable,
    TTAError,
    Unauthorized,
    UnsupportedMediaType,
)
from server.logs import loggable, request_id_var, trace_var

log = logging.getLogger("ttaserve.errors")

STATUS: dict[type[TTAError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidInput: 422,
    Overloaded: 429,
    RateLimited: 429,
    ClientClosed: 499,  # nginx's "client closed request": logged, never read by anyone
    NotReady: 503,
    StorageReadOnly: 503,
    StorageUnavailable: 503,
    DeadlineExceeded: 504,
    StorageFull: 507,  # WebDAV's Insufficient Storage: the server cannot store what the request asks it to
}
COUNTED_AS_REJECTED = (413, 429, 503, 504)
# RFC 6750: a 401 names the scheme; a 403 for a key that is known but not allowed says which scope it lacks.
CHALLENGE: dict[type[TTAError], str] = {
    Unauthorized: 'Bearer realm="ttaserve"',
    Forbidden: 'Bearer realm="ttaserve", error="insufficient_scope", scope="admin"',
}


def status_of(exc: TTAError) -> int:
    """The HTTP status of ``exc``: its class's, or its nearest base class's; 500 for anything else."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(code: str, message: str, request_id: str | None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def request_id_of(request: Request) -> str | None:
    rid = getattr(request.state, "request_id", None)
    return rid if isinstance(rid, str) else None


@contextmanager
def logging_as(request: Request) -> Iterator[None]:
    """Log with the request's id and trace: the 500 handler runs outside the middleware that sets them."""
    rid = request_id_of(request)
    token = request_id_var.set(rid or "-")
    trace_token = trace_var.set(getattr(request.state, "trace", None))
    try:
        yield
    finally:
        trace_var.reset(trace_token)
        request_id_var.reset(token)


def respond(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Log the error with the request id, count a refusal, and render the shared body."""
    rid = request_id_of(request)
    level = logging.ERROR if status >= 500 and status not in (503, 504) else logging.INFO
    path = loggable(request.url.path)
    with logging_as(request):
        log.log(level, "%s %s -> %d %s: %s", request.method, path, status, code, loggable(message))
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None and status in COUNTED_AS_REJECTED:
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


def allowed_methods(request: Request) -> str | None:
    """Every method the API documents for the request's path, for ``Allow``: Starlette's 405 names only the
    methods of the first route of the path (``GET`` of ``/v1/label-sets/{name}``, not its ``DELETE``)."""
    path = request.scope["path"]
    paths = request.app.openapi()["paths"]
    if path in paths:  # a literal path (/v1/jobs/finetune) is its own resource, not an id of /v1/jobs/{job_id}
        return ", ".join(sorted(method.upper() for method in paths[path])) or None
    methods: set[str] = set()
    for template, item in paths.items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), path):
            methods |= {method.upper() for method in item}
    return ", ".join(sorted(methods)) or None


def install_handlers(app: FastAPI) -> None:
    """Register the mapping from exceptions to the shared error shape."""

    async def tta_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TTAError)
        headers = {"Retry-After": f"{exc.retry_after_s:g}"} if exc.retry_after_s is not None else {}
        challenge = CHALLENGE.get(type(exc))
        if challenge is not None:
            headers["WWW-Authenticate"] = challenge
        return respond(request, status_of(exc), exc.code, exc.message, headers)

    async def validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return respond(request, 422, "validation_error", _describe_validation(exc))

    async def http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        allowed = allowed_methods(request) if exc.status_code == 405 else None
        if allowed:  # else Starlette's, for a path the API does not document (/docs)
            headers["Allow"] = allowed
        return respond(request, exc.status_code, code, str(exc.detail), headers)

    async def gone(request: Request, exc: Exception) -> JSONResponse:
        # The client left while its body was arriving: nobody reads this answer, but it is logged as gone.
        return await tta_error(request, ClientClosed("the client closed the connection while sending its body"))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        with logging_as(request):
            log.exception("unhandled error on %s %s", request.method, loggable(request.url.path), exc_info=exc)
        return respond(request, 500, "internal_error", "internal server error; see the server log")

    app.add_exception_handler(TTAError, tta_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(ClientDisconnect, gone)
    app.add_exception_handler(Exception, unexpected)
