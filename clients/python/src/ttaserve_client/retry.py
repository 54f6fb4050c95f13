"""When to try a call again, and how long to wait first.

Retried: a connection that could not be made or broke before an answer, and the answers that mean
"later" (429 queue full, 503 not ready or stopping). The wait doubles from ``backoff_s`` up to
``max_backoff_s``, with full jitter (a uniform draw below it), so clients that failed together do not
come back together; a ``Retry-After`` header (seconds or an HTTP date) is honoured as the least wait.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass, field

RETRY_STATUSES = frozenset({429, 503})


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class RetryPolicy:
    retries: int = 3  # tries after the first
    backoff_s: float = 0.25
    max_backoff_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def wait_s(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0)."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        jittered = self.rng.uniform(0, ceiling)
        told = retry_after_s(retry_after)
        return min(self.max_backoff_s, max(jittered, told)) if told is not None else jittered
