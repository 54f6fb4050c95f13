"""What a call can raise: the server's error answer, or no answer at all."""

from __future__ import annotations

from typing import Any

import httpx


class TTAError(Exception):
    """Base of the client's errors."""


class ApiError(TTAError):
    """An error answer: the HTTP status, the server's stable ``code`` and message, and the request id to
    quote when asking about it (the server logs every line of the request under that id)."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None, body: Any = None):
        super().__init__(f"{status} {code}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.status, self.code, self.message, self.request_id, self.body = status, code, message, request_id, body

    @classmethod
    def of(cls, response: httpx.Response) -> ApiError:
        request_id = response.headers.get("x-request-id")
        try:
            body = response.json()
            error = body["error"]
            return cls(
                response.status_code, error["code"], error["message"], error.get("request_id") or request_id, body
            )
        except (ValueError, KeyError, TypeError):
            text = response.text.strip()[:500] or response.reason_phrase
            return cls(response.status_code, "http_error", text, request_id)


class ConnectionFailed(TTAError):
    """The server could not be reached, or the connection broke, on every attempt."""
