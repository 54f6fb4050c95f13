"""What a handler hands the engine: a job (one request's images, classes and how to classify them),
and what the engine hands back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from server.adaptation import ImageReport
from server.errors import ClientClosed, DeadlineExceeded


@dataclass(eq=False)
class Job:
    """One request's images and classes, waiting for a lane."""

    images: torch.Tensor  # [N, 3, H, W] base views (the normal preprocessing), CPU
    labels: tuple[str, ...]
    templates: tuple[str, ...]
    method: str
    options: Any
    future: asyncio.Future[JobOutput]
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which the job is not worth running
    originals: list[torch.Tensor] | None = None  # [3, H0, W0] uint8 per image, for methods that make views
    seed: int = 0
    descriptions: tuple[tuple[str, ...], ...] | None = None  # per label, from its label set (TPS's prototypes)
    gate: float | None = None  # skip adapting images whose calibrated zero-shot margin is at least this
    gate_temperature: float = 1.0  # the zero-shot temperature that calibrates the margin
    cost_s: float = 0.0  # estimated adaptation seconds, held against the lane's budget while admitted
    skipped: str | None = None  # "overload": adaptation was refused and the job runs zero-shot
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # the client went away

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def batchable(self) -> bool:
        """Zero-shot jobs share encoder batches in the zero-shot lane; the others go to the adaptation lane."""
        return self.originals is None

    def stopped(self) -> bool:
        return self.cancelled or time.monotonic() > self.deadline

    def stop_error(self) -> Exception:
        if self.cancelled:
            return ClientClosed("the client closed the connection")
        return DeadlineExceeded("the request passed its deadline during adaptation")


@dataclass
class JobOutput:
    logits: torch.Tensor  # [N, C] float32, CPU: the method's final logits
    timings: dict[str, float]  # seconds per stage: queue, encode, classify (adapt, for adaptation jobs)
    batch_images: int  # images in the forward pass (or stacked adaptation) this job shared
    reports: list[ImageReport] | None = None  # per image, for adaptation jobs
    skipped: str | None = None  # "overload": served zero-shot because the adaptation lane was full
