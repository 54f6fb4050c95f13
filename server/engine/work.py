"""What the engine is asked to do and what it hands back: work items, and how results reach the event loop.

``Work`` is one classify request as the engine sees it (its images, classes and method); the engine
wraps it in a ``Job`` with the future its caller awaits, its deadline and its bookkeeping. Results and
errors are handed to the caller's event loop with ``Job.resolve`` and ``Job.fail``, from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters import Method, MethodOptions
from adapters.online import OnlineReport, OnlineState
from adapters.views import clip_view_frames
from server.engine.classes import ClassText, TextBuild
from server.engine.resident import Resident
from server.errors import ClientClosed, DeadlineExceeded


@dataclass(frozen=True)
class Demand:
    """What an adaptation request asks of the adaptation lane, known before its images are decoded."""

    method: Method[Any]
    options: MethodOptions
    n_images: int
    n_classes: int


@dataclass(frozen=True, eq=False)
class AdapterUse:
    """The few-shot adapter(s) a request is served through: one it names, or candidates to route each image to."""

    adapters: tuple[Resident, ...]
    refs: tuple[str, ...]  # NAME@vN of each, for the answer
    alpha: float = 1.0  # how far from the frozen model's features toward the adapter's (0: exactly zero-shot)
    class_distance: bool = (
        False  # APEX's rule instead of alpha, per class by distance to the training labels (zero-shot)
    )
    top_k: int | None = None  # routing: at most this many experts per image; None: the one named adapter
    min_sim: float = 0.0  # routing: an expert whose prototypes are less similar than this is not used

    @property
    def routed(self) -> bool:
        return self.top_k is not None

    @property
    def key(self) -> tuple[str, float] | None:
        """What images adapted together must share: the vision side (a lora part) and the blend."""
        first = self.adapters[0]
        return (first.sha256, self.alpha) if "lora" in first.adapter.card.parts else None


@dataclass(frozen=True)
class Route:
    """The experts one image was routed to (empty: none cleared ``min_sim``, the frozen model answered)."""

    used: tuple[tuple[str, float], ...]  # (NAME@vN, similarity), most similar first
    best: float  # the highest similarity of any candidate


@dataclass(frozen=True, eq=False)
class Work:
    """One request's images and classes, and how to classify them."""

    images: torch.Tensor  # [N, 3, H, W] base views (the normal preprocessing), CPU
    labels: tuple[str, ...]
    templates: tuple[str, ...]
    method: Method[Any]
    options: MethodOptions
    originals: list[torch.Tensor] | None = None  # [3, H0, W0] uint8 per image, for methods that adapt; None: zero-shot
    seed: int = 0
    descriptions: tuple[tuple[str, ...], ...] | None = None  # per label, from its label set (options.descriptions)
    gate: float | None = None  # skip adapting images whose calibrated zero-shot margin is at least this
    gate_margin: Callable[[torch.Tensor], float] | None = None  # [C] zero-shot logits -> their calibrated margin
    text_build: TextBuild | None = None  # the class features' tokens when they were not cached (made off the lanes)
    # A video: ``images`` are the frames of one clip, answered once, pooled by "mean" (embeddings) or "max"
    # (logits); ``originals`` then holds one [T, 3, H0, W0] tensor, the frames views are cut from.
    pooling: str | None = None
    session: OnlineState | None = None  # a session's state for these classes: updated and applied in the runner
    adapter: AdapterUse | None = None  # serve through a few-shot adapter (or route among several)

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_answers(self) -> int:
        """Answers the work gives: one per image, or one for a video."""
        return 1 if self.pooling else self.n_images

    @property
    def adapts(self) -> bool:
        return self.originals is not None

    @property
    def class_text(self) -> ClassText:
        """What the class features are built from (the label set's descriptions when the options mix them in)."""
        return ClassText.of(self.labels, self.templates, self.descriptions, self.options.descriptions.mix)

    @property
    def demand(self) -> Demand:
        # A video is adapted once, on views of clip_view_frames(T) frames each: as many images' views.
        n = clip_view_frames(self.n_images) if self.pooling else self.n_images
        return Demand(self.method, self.options, n, len(self.labels))


@dataclass
class ImageReport:
    """What adaptation did for one image (the ``adaptation`` block of a result)."""

    zero_shot_logits: torch.Tensor  # [C] the base view, unadapted
    steps: int
    views: int
    selected_views: int
    seconds: float
    order: torch.Tensor | None = None  # [C] class ranking when it is not the logits' (ZERO)
    extra: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # "confident" or "memory": answered zero-shot, nothing was adapted
    batch_images: int = 1  # images adapted together with this one (itself included)
    memory_bytes: int | None = None  # estimated activation bytes adapting this image holds


@dataclass
class JobOutput:
    logits: torch.Tensor  # [N, C] float32, CPU: the method's final logits
    timings: dict[str, float]  # seconds per stage: queue, encode, classify (adapt, for adaptation jobs)
    batch_images: int  # images in the forward pass (or stacked adaptation) this job shared
    reports: list[ImageReport] | None = None  # per image, for adaptation jobs
    skipped: str | None = None  # "overload": served zero-shot because the adaptation lane was full
    zero_shot_logits: torch.Tensor | None = None  # [N, C] before the session's state (for session work)
    session: list[OnlineReport] | None = None  # per image, what the session's state did
    routes: list[Route] | None = None  # per image, the adapters routing chose


def _mark_read(future: asyncio.Future[JobOutput]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(eq=False)
class Job:
    """``Work`` waiting for a lane, with the future its caller awaits."""

    work: Work
    future: asyncio.Future[JobOutput]
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which the job is not worth running
    adapts: bool  # runs in the adaptation lane (False: zero-shot, including adaptation refused as overload)
    cost_s: float = 0.0  # estimated adaptation seconds, held against the lane's budget while admitted
    build: TextBuild | None = None  # class features still to encode, a chunk per zero-shot lane turn
    skipped: str | None = None  # "overload": adaptation was refused and the job runs zero-shot
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # the client went away

    @property
    def n_images(self) -> int:
        return self.work.n_images

    def __post_init__(self) -> None:
        # When the caller stops waiting (it went away, or its deadline passed), asyncio.shield drops its hold
        # on the future, and the error the lane sets later would be logged as "Future exception was never
        # retrieved" once collected. The caller has been answered already: mark every outcome as read.
        self.future.add_done_callback(_mark_read)

    def stopped(self) -> bool:
        return self.cancelled or time.monotonic() > self.deadline

    def stop_error(self) -> Exception:
        if self.cancelled:
            return ClientClosed("the client closed the connection")
        return DeadlineExceeded("the request passed its deadline during adaptation")

    def resolve(self, output: JobOutput) -> None:
        """Hand ``output`` to the caller (from any thread)."""
        self._settle(lambda: self.future.set_result(output))

    def fail(self, exc: BaseException) -> None:
        """Hand ``exc`` to the caller (from any thread)."""
        self._settle(lambda: self.future.set_exception(exc))

    def _settle(self, complete: Callable[[], None]) -> None:
        """Complete the future on its event loop, unless it is done or nobody waits any more."""

        def on_loop() -> None:
            if not self.future.done():
                complete()

        with contextlib.suppress(RuntimeError):  # the loop is closed: the caller is gone
            self.loop.call_soon_threadsafe(on_loop)
