"""ASGI middleware: request ids, trace context, the body-size limit, the drain's count of requests in flight, and
an access log line per request (with the API key's name)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.drain import UNCOUNTED_PATHS, Drain
from server.api.errors import error_body
from server.errors import PayloadTooLarge
from server.logs import key_name_var, loggable, parse_traceparent, request_fields_var, request_id_var, trace_var

log = logging.getLogger("ttaserve.access")
_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces: safe to log and echo


class RequestContext:
    """Echo or generate ``X-Request-ID``, cap the body at ``max_body_bytes``, log one access line."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Any = None, drain: Drain | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        sent = headers.get("x-request-id", "")
        rid = sent if _CLIENT_ID.match(sent) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        token = request_id_var.set(rid)
        trace = parse_traceparent(headers.get("traceparent", ""))
        scope["state"]["trace"] = trace
        trace_token = trace_var.set(trace)
        fields: dict[str, Any] = {}
        fields_token = request_fields_var.set(fields)
        key_token = key_name_var.set("-")  # ``server.api.auth`` names the caller once it knows the key
        started = time.monotonic()
        status = 0
        counted = scope.get("path", "") not in UNCOUNTED_PATHS
        if counted:
            self._enter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                raw = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                raw.append((b"x-request-id", rid.encode("latin-1")))
                message["headers"] = raw
            await send(message)

        try:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await self._too_large(send_with_id, rid, int(declared))
                return
            await self.app(scope, self._counting(receive), send_with_id)
        except Exception:
            # The 500 handler answers outside this middleware, after this; the access line says what it sends.
            status = status or 500
            raise
        finally:
            path = scope.get("path", "")
            if counted:
                elapsed_ms = 1000 * (time.monotonic() - started)
                method = scope.get("method")
                key_name = state.get("key_name")
                if key_name:
                    key_name_var.set(key_name)
                shown = loggable(path)
                access = {"method": method, "path": shown, "status": status, "duration_ms": round(elapsed_ms, 1)}
                if key_name:
                    access["key"] = key_name
                who = f" key={key_name}" if key_name else ""
                log.info("%s %s %d %.1f ms%s", method, shown, status, elapsed_ms, who, extra=access | fields)
                self._leave()
            key_name_var.reset(key_token)
            request_fields_var.reset(fields_token)
            trace_var.reset(trace_token)
            request_id_var.reset(token)

    def _enter(self) -> None:
        if self.drain is not None:
            self.drain.enter()
        if self.metrics is not None:
            self.metrics.http_inflight.inc()

    def _leave(self) -> None:
        if self.metrics is not None:
            self.metrics.http_inflight.dec()
        if self.drain is not None:
            self.drain.leave()

    def _counting(self, receive: Receive) -> Receive:
        """Count body bytes as they arrive: a chunked body has no Content-Length to check up front."""
        total = 0
        limit = self.max_body_bytes

        async def wrapped() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > limit:
                    raise PayloadTooLarge(f"the request body exceeds {limit} bytes (TTA_MAX_BODY_BYTES)")
            return message

        return wrapped

    async def _too_large(self, send: Send, rid: str, size: int) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason="body_too_large").inc()
        message = f"the request body is {size} bytes; the limit is {self.max_body_bytes} (TTA_MAX_BODY_BYTES)"
        body = json.dumps(error_body("body_too_large", message, rid)).encode()
        log.info("413 body_too_large: %s", message)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
