"""Training jobs of ``Client`` and ``AsyncClient``: submit a few-shot fine-tune, follow it, list and cancel jobs.

Kept apart from ``client.py`` as two small mixins over the clients' ``send``; the calls themselves are built
once in ``calls.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ttaserve_client.calls import Call, Calls
from ttaserve_client.images import ImageLike
from ttaserve_client.models import Job

T = TypeVar("T")


class Jobs:
    """``Client``'s training jobs."""

    def send(self, call: Call[T]) -> T:
        raise NotImplementedError

    def finetune(
        self,
        label_set: str,
        images: Sequence[ImageLike],
        labels: Sequence[str],
        name: str,
        *,
        group: str | None = None,
        anchors: Mapping[str, Any] | None = None,
        **config: Any,
    ) -> Job:
        """Queue the training of adapter ``name`` for ``label_set``'s labels on labelled images (each image's
        label, in order). ``config``: ``type`` (apex, prompt, lora), ``steps``, ``lr``, ``batch_size``, ``seed``,
        ... ``anchors``: ``{"captions": [(image, text)], "pool": [(image, text)], "retrieve_k": k}``."""
        return self.send(Calls.finetune(label_set, images, labels, name, group, config, anchors))

    def jobs(self) -> list[Job]:
        """Your jobs, oldest first."""
        return self.send(Calls.jobs())

    def job(self, job_id: str) -> Job:
        return self.send(Calls.job(job_id))

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued or running job; nothing is published."""
        return self.send(Calls.cancel_job(job_id))

    def wait_job(self, job_id: str, poll_s: float = 0.5, progress: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job has ended (succeeded, failed or cancelled); ``progress`` sees every poll."""
        while True:
            job = self.job(job_id)
            if progress is not None:
                progress(job)
            if job.ended:
                return job
            time.sleep(poll_s)


class AsyncJobs:
    """``AsyncClient``'s training jobs."""

    async def send(self, call: Call[T]) -> T:
        raise NotImplementedError

    async def finetune(
        self,
        label_set: str,
        images: Sequence[ImageLike],
        labels: Sequence[str],
        name: str,
        *,
        group: str | None = None,
        anchors: Mapping[str, Any] | None = None,
        **config: Any,
    ) -> Job:
        return await self.send(Calls.finetune(label_set, images, labels, name, group, config, anchors))

    async def jobs(self) -> list[Job]:
        return await self.send(Calls.jobs())

    async def job(self, job_id: str) -> Job:
        return await self.send(Calls.job(job_id))

    async def cancel_job(self, job_id: str) -> Job:
        return await self.send(Calls.cancel_job(job_id))

    async def wait_job(self, job_id: str, poll_s: float = 0.5) -> Job:
        while not (job := await self.job(job_id)).ended:
            await asyncio.sleep(poll_s)
        return job
