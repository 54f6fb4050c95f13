"""Typed errors: what went wrong, with a stable ``code`` for machines and a message for people.

Any layer raises these; ``server.api.errors`` maps each class to its HTTP status in one table and
renders every error as ``{"error": {"code", "message", "request_id"}}``. Nothing here knows HTTP.
"""

from __future__ import annotations


class TTAError(Exception):
    """Base of every error the service reports; ``code`` is stable, ``message`` is for people."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s  # when the same request may succeed if tried again


class ClientError(TTAError):
    """The request is at fault; sending it again unchanged will fail again."""


class BadRequest(ClientError):
    """The body cannot be parsed at all (malformed JSON or multipart, a malformed header)."""

    code = "bad_request"


class InvalidInput(ClientError):
    """The body parses but a value is unacceptable (a bad image, an empty label, ...)."""

    code = "invalid_input"


class NotFound(ClientError):
    code = "not_found"


class Conflict(ClientError):
    code = "conflict"


class Unauthorized(ClientError):
    """No API key, or one the server does not know (keys are configured)."""

    code = "unauthorized"


class Forbidden(ClientError):
    """A known API key that may not do this (changing state takes an admin key)."""

    code = "forbidden"


class PayloadTooLarge(ClientError):
    code = "body_too_large"


class UnsupportedMediaType(ClientError):
    code = "unsupported_media_type"


class Rejected(TTAError):
    """The server cannot take the request now; it may succeed later (``retry_after_s``)."""


class Overloaded(Rejected):
    """The engine's queue is full."""

    code = "overloaded"


class RateLimited(Rejected):
    """The caller has used its rate (images per second, with a burst); ``retry_after_s`` says when it may go on."""

    code = "rate_limited"


class NotReady(Rejected):
    """The model is loading, failed to load, or the server is shutting down."""

    code = "not_ready"


class StorageFull(TTAError):
    """The data directory's disk is full: nothing more can be stored (deleting still may free space)."""

    code = "storage_full"


class StorageReadOnly(Rejected):
    """The data directory cannot be written (a read-only mount or file): writes are refused, reads go on."""

    code = "storage_read_only"


class StorageUnavailable(Rejected):
    """The shared database (TTA_DATABASE_URL) cannot be reached now: requests that need it fail until it is back."""

    code = "storage_unavailable"


class DeadlineExceeded(TTAError):
    """The request did not finish within its deadline."""

    code = "timeout"


class ClientClosed(TTAError):
    """The client went away before its answer was ready."""

    code = "client_closed_request"


class ConfigError(Exception):
    """The server cannot start with this configuration; the message names the setting to change."""
