"""The engine: the only code that runs the model.

One worker thread owns the device. It loads the backbone, warms it up, then serves jobs from a
bounded queue. Async request handlers submit a job and await its future; they never touch the
model. Consecutive zero-shot jobs are micro-batched: the worker takes the first waiting job, waits
up to ``max_batch_delay_ms`` for more, encodes up to ``max_batch_size`` images in one forward
pass, then classifies each job against its own class features. Adaptation jobs (any other method)
run alone, image by image, through ``adapt_image``: views from the image's seeded generator, one
encoder pass, the method's steps on state that lives only for that image.

A full queue raises ``Overloaded`` (429); a job whose deadline passes is dropped before it runs (or
between the images of an adaptation job) and its handler answers 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters import AdaptInput, Method, get_method
from adapters.views import make_views
from server.backbone import Backbone
from server.errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("ttaserve.engine")


@dataclass
class Job:
    """One request's images and classes, waiting for the worker."""

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
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def batchable(self) -> bool:
        """Zero-shot jobs share encoder batches; adaptation jobs run one at a time."""
        return self.originals is None


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


@dataclass
class JobOutput:
    logits: torch.Tensor  # [N, C] float32, CPU: the method's final logits
    timings: dict[str, float]  # seconds per stage: queue, encode, classify (adapt, for adaptation jobs)
    batch_images: int  # images in the forward pass this job shared
    reports: list[ImageReport] | None = None  # per image, for adaptation jobs


def image_seed(seed: int, index: int) -> int:
    """The generator seed of image ``index`` of a request: distinct per image, fixed by the request's seed."""
    return (seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1)


def adapt_image(backbone: Backbone, method: Method, options: Any, original: torch.Tensor, base_view: torch.Tensor,
                classes: torch.Tensor, labels: tuple[str, ...],
                generator: torch.Generator) -> tuple[torch.Tensor, ImageReport]:
    """One image through a test-time method: views, one encoder pass, the method's steps, a prediction.

    Args:
        original: [3, H0, W0] uint8, the decoded image (views are cropped from it).
        base_view: [3, h, w] its normal preprocessing (view 0).
        classes: [C, D] class features, a normal (not inference-mode) tensor.
        generator: the image's seeded generator; the only source of randomness.
    Returns:
        the final logits [C] (float32, CPU) and the report.
    """
    started = time.monotonic()
    n_views = method.n_views(options)
    cfg = backbone.preprocess_cfg
    views = make_views(original.to(backbone.device), n_views, backbone.image_size, cfg.mean, cfg.std, generator,
                       base_view=base_view)  # [V, 3, h, w]
    feats = backbone.encode_images(views).clone()  # [V, D]
    inp = AdaptInput(feats, classes, backbone.logit_scale, labels, generator, backbone, views)
    zero_shot = inp.zero_shot_logits()[0].detach()  # [C]
    result = method.adapt(inp, options)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize(backbone.device)
    report = ImageReport(zero_shot.float().cpu(), result.steps, n_views, result.selected_views,
                         time.monotonic() - started, result.order, result.extra)
    return result.logits.detach().float().cpu(), report


class Engine:
    """Owns the device: loads the backbone on its worker thread and runs every job there."""

    def __init__(self, settings: Settings, metrics: Metrics, load: Callable[[], Backbone]):
        self.settings = settings
        self.metrics = metrics
        self._load = load
        self.backbone: Backbone | None = None
        self.load_error: BaseException | None = None
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._loaded = threading.Event()  # set once loading ended, successfully or not
        self._thread = threading.Thread(target=self._run, name="tta-engine", daemon=True)
        self.on_fatal: Callable[[BaseException], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker; loading and warm-up happen on it, in the background."""
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading ended (True) or ``timeout`` passed (False)."""
        return self._loaded.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, let the worker finish the batch it runs, fail what is still queued."""
        with self._cond:
            self._stopping = True
            self._ready.clear()
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            self._fail(job, NotReady("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.metrics.queue_depth.set(0)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # -- submitting -----------------------------------------------------------------------------
    def check_capacity(self) -> None:
        """Raise NotReady or Overloaded now, so a request that would be refused is not decoded first."""
        if not self.ready:
            raise NotReady("the model is still loading; retry shortly", headers={"Retry-After": "1"})
        if len(self._queue) >= self.settings.max_queue_size:
            raise Overloaded(
                f"the queue is full ({self.settings.max_queue_size} jobs waiting); retry later",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )

    async def classify(self, images: torch.Tensor, labels: tuple[str, ...], templates: tuple[str, ...],
                       method: str, options: Any, timeout_s: float,
                       originals: list[torch.Tensor] | None = None, seed: int = 0) -> JobOutput:
        """Queue a classification and wait for it; raises Overloaded, NotReady or DeadlineExceeded.

        With ``originals`` (the decoded images) the job runs ``method``'s adaptation per image, seeded
        by ``seed``; without, it is a zero-shot job and may share an encoder batch with others.
        """
        self.check_capacity()
        loop = asyncio.get_running_loop()
        job = Job(images, labels, templates, method, options, loop.create_future(), loop,
                  deadline=time.monotonic() + timeout_s, originals=originals, seed=seed)
        with self._cond:
            self.check_capacity()
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise DeadlineExceeded(f"the request did not finish within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            job.cancelled = True  # the client went away: do not spend the device on it
            raise

    # -- the worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)
            started = time.monotonic()
            self.backbone = self._load()
            self.backbone.warm_up()
            log.info("model loaded and warmed up in %.2f s", time.monotonic() - started)
            self._ready.set()
        except BaseException as exc:  # noqa: BLE001 - reported through /readyz and on_fatal
            self.load_error = exc
            log.error("model failed to load: %s", exc)
            self._loaded.set()
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        self._loaded.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run_batch(batch)

    def _next_batch(self) -> list[Job] | None:
        """Wait for a job, then gather more for up to ``max_batch_delay_ms`` within ``max_batch_size``."""
        limit = self.settings.max_batch_size
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            batch = [self._queue.popleft()]
            if not batch[0].batchable:
                self.metrics.queue_depth.set(len(self._queue))
                return batch
            n = batch[0].n_images
            until = time.monotonic() + self.settings.max_batch_delay_ms / 1000
            while n < limit:
                if not self._queue:
                    remaining = until - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
                    continue
                if not self._queue[0].batchable or n + self._queue[0].n_images > limit:
                    break
                job = self._queue.popleft()
                batch.append(job)
                n += job.n_images
            self.metrics.queue_depth.set(len(self._queue))
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if job.cancelled or job.future.done():
                continue
            if now > job.deadline:
                self._fail(job, DeadlineExceeded("the request waited in the queue past its deadline"))
                continue
            live.append(job)
        if not live:
            return
        backbone = self.backbone
        assert backbone is not None
        if not live[0].batchable:
            self._run_adaptation(live[0], backbone)
            return
        try:
            images = torch.cat([job.images for job in live])  # [B, 3, H, W]
            started = time.monotonic()
            feats = backbone.encode_images(images)  # [B, D]
            self._sync(backbone)
            encode_s = time.monotonic() - started
            self.metrics.batch_size.observe(images.shape[0])
            offset = 0
            for job in live:
                t0 = time.monotonic()
                classes = backbone.class_features(job.labels, job.templates)  # [C, D]
                method = get_method(job.method)
                with torch.inference_mode():
                    logits = method.predict(feats[offset : offset + job.n_images], classes,
                                            backbone.logit_scale, job.options)  # [N, C]
                logits = logits.float().cpu()
                offset += job.n_images
                timings = {"queue": started - job.enqueued_at, "encode": encode_s,
                           "classify": time.monotonic() - t0}
                self._resolve(job, JobOutput(logits, timings, int(images.shape[0])))
            self.metrics.text_cache_bytes.set(backbone.text_cache.bytes)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the worker
            log.exception("batch of %d job(s) failed", len(live))
            for job in live:
                self._fail(job, exc)

    def _run_adaptation(self, job: Job, backbone: Backbone) -> None:
        """Adapt to each image of the job in turn, checking the deadline between images."""
        started = time.monotonic()
        method = get_method(job.method)
        assert job.originals is not None
        try:
            # A clone outside inference mode: the cached features are inference tensors, which autograd refuses.
            classes = backbone.class_features(job.labels, job.templates).clone()  # [C, D]
            logits, reports = [], []
            for i, original in enumerate(job.originals):
                if job.cancelled or time.monotonic() > job.deadline:
                    raise DeadlineExceeded("the request passed its deadline during adaptation")
                generator = torch.Generator().manual_seed(image_seed(job.seed, i))
                final, report = adapt_image(backbone, method, job.options, original, job.images[i], classes,
                                            job.labels, generator)
                logits.append(final)
                reports.append(report)
                self.metrics.batch_size.observe(report.views)
            timings = {"queue": started - job.enqueued_at, "adapt": time.monotonic() - started}
            self._resolve(job, JobOutput(torch.stack(logits), timings, reports[0].views, reports))
        except ValueError as exc:  # a method that cannot run on this model (e.g. no prompt-learning support)
            self._fail(job, InvalidInput(str(exc), code="method_unsupported"))
        except Exception as exc:  # noqa: BLE001 - reported to the request; the worker carries on
            if not isinstance(exc, DeadlineExceeded):
                log.exception("adaptation with %s failed", job.method)
            self._fail(job, exc)

    @staticmethod
    def _sync(backbone: Backbone) -> None:
        if backbone.device.type == "cuda":
            torch.cuda.synchronize(backbone.device)

    @staticmethod
    def _resolve(job: Job, output: JobOutput) -> None:
        _settle(job, lambda: job.future.set_result(output))

    @staticmethod
    def _fail(job: Job, exc: BaseException) -> None:
        _settle(job, lambda: job.future.set_exception(exc))


def _settle(job: Job, complete: Callable[[], None]) -> None:
    """Complete a job's future on its event loop, unless it is done or nobody waits any more."""

    def _on_loop() -> None:
        if not job.future.done():
            complete()

    with contextlib.suppress(RuntimeError):  # the loop is closed: the handler is gone
        job.loop.call_soon_threadsafe(_on_loop)
