"""Logging with the request id, and the API key's name, on every record logged while a request is handled."""

from __future__ import annotations

import contextvars
import logging
import re

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# The name of the caller's API key (never the key): '-' outside requests and without keys.
key_name_var: contextvars.ContextVar[str] = contextvars.ContextVar("key_name", default="-")

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(key_name)s] %(message)s"
_installed = False


def install_record_factory() -> None:
    """Give every log record ``request_id`` and ``key_name`` attributes (``-`` outside requests). Idempotent."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id_var.get()
        record.key_name = key_name_var.get()
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


def configure_logging(level: str) -> None:
    install_record_factory()
    logging.basicConfig(level=level.upper(), format=FORMAT, force=True)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def loggable(text: str) -> str:
    """``text`` with control characters escaped: a newline in a URL path (%0A) cannot start a forged log line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
