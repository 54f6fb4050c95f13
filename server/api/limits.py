"""Rate limits: a token bucket per API key name (per client address without keys), counted in images.

A bucket holds at most ``TTA_RATE_LIMIT_BURST`` images and refills at ``TTA_RATE_LIMIT_RPS`` images a
second. A classify request costs its images, each weighted by what the engine estimates its method costs
against encoding it once (zero-shot: 1; see ``CostModel.in_images``). It is let through when the bucket
holds its cost, or is full (a request dearer than the burst can still run, once, and leaves the bucket in
debt); otherwise it is refused with 429 ``rate_limited`` and a ``Retry-After`` of the seconds until it
would be let through, and nothing is taken. Time comes from ``clock`` so tests can hold it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from server.errors import RateLimited
from server.metrics import Metrics

MAX_BUCKETS = 10_000  # past this many, buckets that have refilled (they hold nothing to remember) are dropped


class TokenBuckets:
    """One bucket per caller; ``rate`` 0 turns limiting off."""

    def __init__(
        self, rate: float, burst: float, metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic
    ):
        self.rate = rate
        self.burst = burst
        self.metrics = metrics
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when counted)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def charge(self, caller: str, images: float, reason: str, describe: str) -> None:
        """Take ``images`` from ``caller``'s bucket, or raise RateLimited (``reason`` labels the metric)."""
        if not self.enabled:
            return
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.get(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            needed = min(images, self.burst)
            if tokens < needed:
                wait_s = max(1, math.ceil((needed - tokens) / self.rate))
                self._buckets[caller] = (tokens, now)
                if self.metrics is not None:
                    self.metrics.rate_limited.labels(reason=reason).inc()
                raise RateLimited(
                    f"{describe} is over its rate of {self.rate:g} images/s (burst {self.burst:g}, "
                    f"TTA_RATE_LIMIT_RPS, TTA_RATE_LIMIT_BURST): this request costs {images:.3g} images; "
                    f"retry in {wait_s} s",
                    retry_after_s=wait_s,
                )
            self._buckets[caller] = (tokens - images, now)
            if len(self._buckets) > MAX_BUCKETS:
                self._prune(now)

    def _prune(self, now: float) -> None:
        full = [c for c, (tokens, then) in self._buckets.items() if tokens + (now - then) * self.rate >= self.burst]
        for caller in full:
            del self._buckets[caller]
