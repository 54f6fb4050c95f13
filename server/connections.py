"""What the HTTP server does with connections before any request: idle ones are closed, and the process may
hold as many as its hard file-descriptor limit allows.

uvicorn times out a connection that is idle *between* requests (``timeout_keep_alive``), but not one that
never sends a request: 1,100 such connections used to exhaust the 1,024 descriptors of the process,
and then it answered nobody. ``protocol(first_request_timeout_s)`` is uvicorn's h11 protocol with a
deadline for the first request's headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource

from uvicorn.protocols.http.h11_impl import H11Protocol


def protocol(first_request_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose first request has not arrived in time."""

    class FirstRequestTimeout(H11Protocol):
        _first_request_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._first_request_timer = self.loop.call_later(first_request_timeout_s, self._no_request)

        def _no_request(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._first_request_timer is not None:
                self._first_request_timer.cancel()
            super().connection_lost(exc)

    return FirstRequestTimeout


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]
