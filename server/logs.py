"""Logging with the request id on every record logged while a request is handled."""

from __future__ import annotations

import contextvars
import logging

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
