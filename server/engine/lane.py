"""A lane: a queue of jobs and the one worker thread that takes them in batches.

The engine has two, both instances of ``Lane``: zero-shot (encoder micro-batches of any requests) and
adaptation (stacked images of requests with the same method and options). A batch is the first
waiting job and, for up to ``delay_s``, later ones that ``fits`` it, within ``limit`` images; a job
with more images than are left waits for a later batch. Both lanes share the engine's
lock, so admission sees both queues at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from server.engine.work import Job

log = logging.getLogger("ttaserve.engine")


class Lane:
    """Jobs waiting for one worker thread, which runs them in batches with ``run``."""

    def __init__(
        self,
        name: str,
        lock: threading.Condition,
        run: Callable[[list[Job]], None],
        *,
        limit: Callable[[], int],
        delay_s: Callable[[], float],
        fits: Callable[[Job, Job], bool] = lambda first, job: True,
        on_change: Callable[[], None] = lambda: None,
    ):
        self.name = name
        self._cond = lock
        self._run = run
        self._limit = limit
        self._delay_s = delay_s
        self._fits = fits
        self._on_change = on_change
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []  # the batch the worker runs now
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=f"tta-{name}", daemon=True)

    def __len__(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._thread.start()

    def put(self, job: Job) -> None:
        """Queue ``job``; the caller holds the lock."""
        self._queue.append(job)
        self._cond.notify_all()

    def requeue(self, job: Job) -> bool:
        """Put a job of the running batch back at the end of the queue, unless the lane is stopping
        (then False). The caller holds the lock."""
        if self._stopping:
            return False
        self.put(job)
        return True

    def jobs(self) -> list[Job]:
        """The jobs waiting and the batch running; the caller holds the lock."""
        return [*self._queue, *self._running]

    def stop(self) -> list[Job]:
        """Take no more batches; return the jobs still waiting. The caller holds the lock."""
        self._stopping = True
        pending = list(self._queue)
        self._queue.clear()
        self._cond.notify_all()
        return pending

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _work(self) -> None:
        while (batch := self._next()) is not None:
            try:
                self._run(batch)
            except Exception as exc:
                log.exception("%s batch of %d job(s) failed", self.name, len(batch))
                for job in batch:
                    job.fail(exc)
            finally:
                with self._cond:
                    self._running = []

    def _next(self) -> list[Job] | None:
        """Wait for a job, then gather the jobs that fit it for up to ``delay_s``, within ``limit`` images."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue.popleft()
            batch, n, limit = [first], first.n_images, self._limit()
            until = time.monotonic() + self._delay_s()
            while n < limit and not self._stopping:
                fitting = [j for j in self._queue if self._fits(first, j)]
                match = next((j for j in fitting if n + j.n_images <= limit), None)
                if match is not None:
                    self._queue.remove(match)
                    batch.append(match)
                    n += match.n_images
                    continue
                if fitting:  # the next one that fits has more images than are left: this batch is full
                    break
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._running = batch
            self._on_change()
        return batch
