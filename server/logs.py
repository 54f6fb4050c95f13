"""Logging with the request id, the API key's name and the caller's trace id on every record logged while
a request is handled.

``TTA_LOG_FORMAT=text`` (the default) writes ``time level logger [request id key name] message``, with
`` trace_id=...`` appended when the request carried a W3C ``traceparent`` header. ``json`` writes one
JSON object per line: ``time``, ``level``, ``logger``, ``message``, ``request_id``, ``trace_id`` and
``span_id`` when known, the fields a record was given (the access line's ``method``, ``path``,
``status``, ``duration_ms``, ``outcome``, ``classify_method``), and ``exception`` with the traceback.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
trace_var: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("trace", default=None)
# What the layers learn about the request being handled (its outcome, its classify method), for its access
# line. The middleware puts a fresh dict here per request; the handler, in the same task or a copy of its
# context, fills it in.
request_fields_var: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "request_fields", default=None
)

# The name of the caller's API key (never the key): '-' outside requests and without keys.
key_name_var: contextvars.ContextVar[str] = contextvars.ContextVar("key_name", default="-")

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(key_name)s] %(message)s"
FIELDS = ("method", "path", "status", "duration_ms", "outcome", "classify_method", "key")
_installed = False

# W3C Trace Context: version-traceid-parentid-flags, lowercase hex; version ff and all-zero ids are invalid.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def parse_traceparent(value: str) -> tuple[str, str] | None:
    """The (trace id, parent span id) of a W3C ``traceparent`` header; None when it is not a valid one."""
    match = _TRACEPARENT.match(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id


def note(**fields: Any) -> None:
    """Add ``fields`` (``outcome``, ``classify_method``) to the access line of the request being handled."""
    current = request_fields_var.get()
    if current is not None:
        current.update(fields)


def install_record_factory() -> None:
    """Give every log record ``request_id`` and ``key_name`` (``-`` outside requests), ``trace_id`` and ``span_id``.
    Idempotent."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id_var.get()
        trace = trace_var.get()
        record.trace_id, record.span_id = trace if trace is not None else (None, None)
        record.key_name = key_name_var.get()
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


class TextFormatter(logging.Formatter):
    """The text line, with `` trace_id=...`` appended when the request carried one."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):  # a record made before the factory was installed
            record.request_id = "-"
        line = super().format(record)
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            head, sep, tail = line.partition("\n")  # after the message, before a traceback
            line = f"{head} trace_id={trace_id}{sep}{tail}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is a field, never a line of its own)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for name in ("trace_id", "span_id", *FIELDS):
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level``, as ``text`` or ``json`` lines (uvicorn's own loggers included)."""
    install_record_factory()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def loggable(text: str) -> str:
    """``text`` with control characters escaped: a newline in a URL path (%0A) cannot start a forged log line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
