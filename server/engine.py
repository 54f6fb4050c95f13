"""The engine: the only code that runs the model.

One process, one device, two lanes. The zero-shot lane's worker thread loads the backbone, warms
it up and measures what an image and a prompt cost to encode, then serves zero-shot jobs: it takes
the first waiting job, waits up to ``max_batch_delay_ms`` for more, encodes up to
``max_batch_size`` images in one forward pass and classifies each job against its own class
features. The adaptation lane's worker thread gathers waiting adaptation jobs with the same method
and options (label sets may differ) and adapts up to ``adapt_max_batch`` of their images together
through ``server.adaptation.adapt_images``. Handlers submit a job and await its future.

Admission: a full zero-shot queue raises ``Overloaded`` (429). An adaptation job is admitted when
its estimated cost (``server.admission.CostModel``) fits in the lane's budget beside the work
already admitted; otherwise it is served zero-shot with ``skipped = "overload"``. The lane stacks
images while their estimated activation bytes (``server.admission.MemoryModel``) fit its memory
budget, and serves zero-shot an image that does not fit alone (``"memory"``). With a confidence gate,
images whose calibrated zero-shot margin is already high are not adapted (``"confident"``).
Deadlines and disconnects are checked before a job runs and between adaptation steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from adapters import get_method
from adapters.base import Stopped
from server.adaptation import ImageReport, ImageTask, adapt_images, image_seed, margin
from server.admission import ActivationBytes, CostModel, MemoryModel, default_memory_budget, gpu_peak, stack_within
from server.backbone import Backbone
from server.errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded
from server.jobs import Job, JobOutput
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("ttaserve.engine")


class Engine:
    """Owns the device: loads the backbone and runs every job on its two lane threads."""

    def __init__(self, settings: Settings, metrics: Metrics, load: Callable[[], Backbone]):
        self.settings = settings
        self.metrics = metrics
        self._load = load
        self.backbone: Backbone | None = None
        self.load_error: BaseException | None = None
        self._queue: deque[Job] = deque()  # the zero-shot lane
        self._adapt_queue: deque[Job] = deque()  # the adaptation lane
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._loaded = threading.Event()  # set once loading ended, successfully or not
        self._thread = threading.Thread(target=self._run, name="tta-engine", daemon=True)
        self._adapt_thread = threading.Thread(target=self._run_adapt_lane, name="tta-adapt", daemon=True)
        self.on_fatal: Callable[[BaseException], None] | None = None
        self.costs = CostModel()  # prices adaptation work for admission
        self.pending_s = 0.0  # estimated seconds of admitted, unfinished adaptation work
        self.memory: MemoryModel | None = None  # sizes stacked adaptation batches; set once the model is loaded
        self.gpu_peak_bytes = 0  # the most GPU memory held since start, across the lane's peak measurements

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers; loading and warm-up happen in the background."""
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading ended (True) or ``timeout`` passed (False)."""
        return self._loaded.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, let the workers finish what they run, fail what is still queued."""
        with self._cond:
            self._stopping = True
            self._ready.clear()
            pending = list(self._queue) + list(self._adapt_queue)
            self._queue.clear()
            self._adapt_queue.clear()
            self._cond.notify_all()
        for job in pending:
            self._fail(job, NotReady("the server is shutting down"))
        for thread in (self._thread, self._adapt_thread):
            if thread.is_alive():
                thread.join(timeout)
        self.metrics.queue_depth.set(0)

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + len(self._adapt_queue)

    # -- admission ------------------------------------------------------------------------------
    def estimate_s(self, method: str, options: Any, n_images: int, n_classes: int) -> float:
        """Estimated seconds to adapt ``n_images`` images with ``method`` against ``n_classes`` classes."""
        return self.costs.estimate_s(self.backbone, method, options, n_images, n_classes)

    def _admits(self, cost_s: float, timeout_s: float) -> bool:
        """Whether the adaptation lane takes work of ``cost_s`` seconds that must end within ``timeout_s``.

        An idle lane takes anything (the deadline still applies); a busy one what fits beside its
        admitted work within the budget and the request's own deadline.
        """
        if not self._adapt_queue and self.pending_s <= 0:
            return True
        if len(self._adapt_queue) >= self.settings.max_queue_size:
            return False
        budget = self.settings.adapt_budget_s or self.settings.request_timeout_s
        return self.pending_s + cost_s <= min(budget, timeout_s)

    def check_capacity(self, adaptation: tuple[str, Any, int, int] | None = None, timeout_s: float = 0.0) -> None:
        """Raise NotReady or Overloaded now, so a request that would be refused is not decoded first.

        ``adaptation`` is ``(method, options, n_images, n_classes)`` of an adaptation request: it is
        refused only when it would be served zero-shot and the zero-shot lane is full too.
        """
        if not self.ready:
            raise NotReady("the model is still loading; retry shortly", headers={"Retry-After": "1"})
        if len(self._queue) < self.settings.max_queue_size:
            return
        if adaptation is not None and self._admits(self.estimate_s(*adaptation), timeout_s):
            return
        raise Overloaded(
            f"the queue is full ({self.settings.max_queue_size} jobs waiting); retry later",
            code="queue_full",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    # -- submitting -----------------------------------------------------------------------------
    async def classify(self, images: torch.Tensor, labels: tuple[str, ...], templates: tuple[str, ...],
                       method: str, options: Any, timeout_s: float,
                       originals: list[torch.Tensor] | None = None, seed: int = 0,
                       gate: float | None = None, gate_temperature: float = 1.0,
                       descriptions: tuple[tuple[str, ...], ...] | None = None) -> JobOutput:
        """Queue a classification and wait for it; raises Overloaded, NotReady, DeadlineExceeded or ClientClosed.

        With ``originals`` (the decoded images) the job adapts each image with ``method``, seeded by
        ``seed``, unless the adaptation lane is over its budget: then it runs zero-shot and its
        output says ``skipped = "overload"``. Without, it is a zero-shot job.
        """
        loop = asyncio.get_running_loop()
        job = Job(images, labels, templates, method, options, loop.create_future(), loop,
                  deadline=time.monotonic() + timeout_s, originals=originals, seed=seed, descriptions=descriptions,
                  gate=gate, gate_temperature=gate_temperature)
        with self._cond:
            if job.originals is not None:
                job.cost_s = self.estimate_s(method, options, job.n_images, len(labels))
                if self.ready and self._admits(job.cost_s, timeout_s):
                    self._adapt_queue.append(job)
                    self.pending_s += job.cost_s
                    self.metrics.adapt_pending.set(self.pending_s)
                else:
                    job.originals, job.skipped, job.cost_s = None, "overload", 0.0
            if job.originals is None:
                self.check_capacity()
                self._queue.append(job)
            self.metrics.queue_depth.set(self.queue_depth)
            self._cond.notify_all()
        if job.skipped:
            self.metrics.adapt_skipped.labels(reason=job.skipped).inc(job.n_images)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise DeadlineExceeded(f"the request did not finish within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            job.cancelled = True  # the client went away: do not spend the device on it
            raise

    # -- the zero-shot lane ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)
            started = time.monotonic()
            self.backbone = self._load()
            self.backbone.warm_up()
            budget = self.settings.adapt_memory_bytes or default_memory_budget(self.backbone.device)
            self.memory = MemoryModel(ActivationBytes.measure(self.backbone), budget)
            self.metrics.adapt_memory_budget.set(budget)
            a = self.memory.activations
            log.info("model loaded and warmed up in %.2f s (%.1f ms per image, %.2f ms per prompt; activations "
                     "kept for a backward pass: %.1f MiB per image, %.1f KiB per prompt token; adaptation memory "
                     "budget %.0f MiB)", time.monotonic() - started, self.backbone.image_s * 1e3,
                     self.backbone.prompt_s * 1e3, a.image / 2**20, a.prompt_token / 2**10, budget / 2**20)
        except BaseException as exc:  # noqa: BLE001 - reported through /readyz and on_fatal
            self.load_error = exc
            log.error("model failed to load: %s", exc)
            self._loaded.set()
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        self._adapt_thread.start()
        self._ready.set()
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
            n = batch[0].n_images
            until = time.monotonic() + self.settings.max_batch_delay_ms / 1000
            while n < limit:
                if not self._queue:
                    remaining = until - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
                    continue
                if n + self._queue[0].n_images > limit:
                    break
                job = self._queue.popleft()
                batch.append(job)
                n += job.n_images
            self.metrics.queue_depth.set(self.queue_depth)
        return batch

    def _live(self, batch: list[Job]) -> list[Job]:
        """The jobs still worth running; the others are failed (deadline) or dropped (client gone)."""
        live = []
        for job in batch:
            if job.future.done():
                continue
            if job.stopped():
                self._fail(job, job.stop_error() if job.cancelled else
                           DeadlineExceeded("the request waited in the queue past its deadline"))
                continue
            live.append(job)
        return live

    def _run_batch(self, batch: list[Job]) -> None:
        live = self._live(batch)
        if not live:
            return
        backbone = self.backbone
        assert backbone is not None
        try:
            images = torch.cat([job.images for job in live])  # [B, 3, H, W]
            started = time.monotonic()
            feats = backbone.encode_images(images)  # [B, D]
            backbone.sync()
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
                self._resolve(job, JobOutput(logits, timings, int(images.shape[0]), skipped=job.skipped))
            self.metrics.text_cache_bytes.set(backbone.text_cache.bytes)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the worker
            log.exception("batch of %d job(s) failed", len(live))
            for job in live:
                self._fail(job, exc)

    # -- the adaptation lane --------------------------------------------------------------------
    def _run_adapt_lane(self) -> None:
        while True:
            batch = self._next_adapt_batch()
            if batch is None:
                return
            try:
                self._run_adapt_batch(batch)
            except Exception as exc:  # noqa: BLE001 - the lane must outlive any one batch
                log.exception("adaptation batch failed")
                for job in batch:
                    self._fail(job, exc)
            finally:
                with self._cond:
                    self.pending_s = max(0.0, self.pending_s - sum(job.cost_s for job in batch))
                    if not self._adapt_queue:
                        self.pending_s = 0.0  # nothing admitted is left: no estimate drift carries over
                    self.metrics.adapt_pending.set(self.pending_s)

    def _next_adapt_batch(self) -> list[Job] | None:
        """The first waiting adaptation job and, for up to ``max_batch_delay_ms``, later ones with the same
        method and options, within ``adapt_max_batch`` images (a larger job runs in chunks, alone)."""
        limit = self.settings.adapt_max_batch
        with self._cond:
            while not self._adapt_queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._adapt_queue.popleft()
            batch, n = [first], first.n_images
            until = time.monotonic() + self.settings.max_batch_delay_ms / 1000
            while n < limit and not self._stopping:
                match = next((j for j in self._adapt_queue if j.method == first.method and j.options == first.options
                              and n + j.n_images <= limit), None)
                if match is not None:
                    self._adapt_queue.remove(match)
                    batch.append(match)
                    n += match.n_images
                    continue
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self.metrics.queue_depth.set(self.queue_depth)
        return batch

    def _run_adapt_batch(self, batch: list[Job]) -> None:
        """Adapt the images of ``batch`` together; if a stacked batch fails, each job is retried alone."""
        live = self._live(batch)
        if not live:
            return
        try:
            outputs = self._adapt_jobs(live)
        except Stopped as exc:  # raised only once every image's caller is gone
            log.info("adaptation of %d request(s) with %s %s: %s", len(live), live[0].method, exc,
                     "the client went away" if all(j.cancelled for j in live) else "past the deadline")
            for job in live:
                self._fail(job, job.stop_error())
            return
        except Exception as exc:  # noqa: BLE001 - reported to the request; the worker carries on
            if len(live) > 1:  # find the job that cannot run, without failing the others
                log.warning("a stacked adaptation batch of %d jobs failed (%s); running them one by one",
                            len(live), exc)
                for job in live:
                    self._run_adapt_batch([job])
            elif isinstance(exc, ValueError):  # a method this model cannot run (no prompt-learning support)
                self._fail(live[0], InvalidInput(str(exc), code="method_unsupported"))
            else:
                log.exception("adaptation with %s failed", live[0].method)
                self._fail(live[0], exc)
            return
        for job in live:
            self._settle_adapted(job, outputs.get(id(job)))

    def _settle_adapted(self, job: Job, output: JobOutput | None) -> None:
        if output is None or job.stopped():
            self._fail(job, job.stop_error())
        else:
            self._resolve(job, output)

    def _adapt_jobs(self, jobs: list[Job]) -> dict[int, JobOutput]:
        """Adapt every image of ``jobs`` (same method and options) in chunks of ``adapt_max_batch``."""
        backbone = self.backbone
        assert backbone is not None
        started = time.monotonic()
        method = get_method(jobs[0].method)
        options = jobs[0].options
        # A clone outside inference mode: the cached features are inference tensors, which autograd refuses.
        classes = {id(job): backbone.class_features(job.labels, job.templates,  # [C, D]
                                                    job.descriptions if method.uses_descriptions else None).clone()
                   for job in jobs}
        done: dict[tuple[int, int], tuple[torch.Tensor, ImageReport]] = {}
        assert self.memory is not None
        needs = {id(job): self.memory.image_bytes(backbone, method, options, job.labels) for job in jobs}
        items = [(job, i) for job in jobs for i in range(job.n_images)]
        chunks, too_big = stack_within(items, [needs[id(job)] for job, _ in items], self.memory.budget_bytes,
                                       self.settings.adapt_max_batch)
        if too_big:
            job = too_big[0][0]
            log.warning("%d image(s) of %s need about %.0f MiB each to adapt, over the %.0f MiB memory budget "
                        "(TTA_ADAPT_MEMORY_BYTES): served zero-shot", len(too_big), job.method,
                        needs[id(job)] / 2**20, self.memory.budget_bytes / 2**20)
            self._answer_zero_shot(too_big, classes, done, backbone, "memory")
        for chunk in chunks:
            chunk = [(job, i) for job, i in chunk if not job.stopped()]
            if not chunk:
                continue
            chunk = self._gate(chunk, classes, done, backbone)
            if not chunk:
                continue
            tasks = [ImageTask(job.originals[i], job.images[i], classes[id(job)], job.labels,  # type: ignore[index]
                               torch.Generator().manual_seed(image_seed(job.seed, i)), job.stopped)
                     for job, i in chunk]
            with gpu_peak(backbone.device) as peak:
                outs = adapt_images(backbone, method, options, tasks)
            if peak:
                self.gpu_peak_bytes = max(self.gpu_peak_bytes, peak["before"])
                self.memory.learn(method.name, sum(needs[id(job)] for job, _ in chunk), peak["rise"])
            for (job, i), out in zip(chunk, outs, strict=True):
                done[(id(job), i)] = out
            self.metrics.adapt_batch_size.observe(len(chunk))
        elapsed = time.monotonic() - started
        if not any(job.gate for job in jobs):  # a gated batch skipped work it was priced for: it says little
            self.costs.learn(jobs[0].method, sum(job.cost_s for job in jobs), elapsed)
        outputs = {}
        for job in jobs:
            if any((id(job), i) not in done for i in range(job.n_images)):
                continue  # stopped part-way: its caller is gone
            logits, reports = zip(*(done[(id(job), i)] for i in range(job.n_images)), strict=True)
            for report in reports:
                report.memory_bytes = int(needs[id(job)])
            timings = {"queue": started - job.enqueued_at, "adapt": elapsed}
            outputs[id(job)] = JobOutput(torch.stack(logits), timings, max(r.batch_images for r in reports),
                                         list(reports))
        return outputs

    def _gate(self, chunk: list[tuple[Job, int]], classes: dict[int, torch.Tensor],
              done: dict[tuple[int, int], tuple[torch.Tensor, ImageReport]],
              backbone: Backbone) -> list[tuple[Job, int]]:
        """Answer zero-shot the gated images whose calibrated margin passes their gate; return the others."""
        gated = [(job, i) for job, i in chunk if job.gate is not None]
        if not gated:
            return chunk
        confident = self._answer_zero_shot(
            gated, classes, done, backbone, "confident",
            when=lambda job, logits: float(margin(logits[None], job.gate_temperature)[0]) >= job.gate)
        return [(job, i) for job, i in chunk if (id(job), i) not in confident]

    def _answer_zero_shot(self, items: list[tuple[Job, int]], classes: dict[int, torch.Tensor],
                          done: dict[tuple[int, int], tuple[torch.Tensor, ImageReport]], backbone: Backbone,
                          reason: str, when: Callable[[Job, torch.Tensor], bool] = lambda job, logits: True
                          ) -> set[tuple[int, int]]:
        """Answer ``items`` (those ``when`` picks from their zero-shot logits) zero-shot, skipped for ``reason``."""
        t0 = time.monotonic()
        feats = backbone.encode_images(torch.stack([job.images[i] for job, i in items]))  # [N, D]
        answered = set()
        for row, (job, i) in enumerate(items):
            logits = (backbone.logit_scale * feats[row] @ classes[id(job)].T).float().cpu()  # [C]
            if when(job, logits):
                answered.add((id(job), i))
                done[(id(job), i)] = (logits, ImageReport(logits, 0, 1, 1, time.monotonic() - t0, skipped=reason))
        if answered:
            self.metrics.adapt_skipped.labels(reason=reason).inc(len(answered))
        return answered

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
