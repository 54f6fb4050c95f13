"""Draining: on SIGTERM the process stops taking new work but keeps its socket open until what it has is done.

``Drain`` counts the HTTP requests being handled (the probes and ``/metrics`` excepted). Once
``begin()`` is called, ``/readyz`` answers 503 ``shutting_down`` (a load balancer takes the replica out
of rotation and can tell a drain from a crash), new classify and calibration requests get 503
``shutting_down`` with ``Retry-After`` (another replica can take them), and ``wait_idle`` returns when
the requests already in flight have finished, or when the grace period is over. ``python -m server``
then tells uvicorn to exit.
"""

from __future__ import annotations

import threading
import time

from server.errors import NotReady

UNCOUNTED_PATHS = ("/healthz", "/readyz", "/metrics")  # probes: never in flight long, and answered while draining


class Drain:
    """In-flight HTTP requests, and whether the process is draining."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        self._cond = threading.Condition()
        self._active = 0
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def active(self) -> int:
        return self._active

    def enter(self) -> None:
        with self._cond:
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def begin(self) -> int:
        """Refuse new work from now on; returns how many requests are in flight."""
        with self._cond:
            self._draining = True
            return self._active

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight (True) or ``timeout_s`` has passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._active > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def check(self) -> None:
        """Raise NotReady (503 ``shutting_down``, with Retry-After) while draining."""
        if self._draining:
            raise NotReady(
                "the server is shutting down; retry on another replica",
                code="shutting_down",
                retry_after_s=self.retry_after_s,
            )
