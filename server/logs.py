"""Logging with the request id on every record logged while a request is handled."""

from __future__ import annotations

import contextvars
import logging
import re

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
_installed = False


def install_record_factory() -> None:
    """Give every log record a ``request_id`` attribute (``-`` outside requests). Idempotent."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id_var.get()
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
