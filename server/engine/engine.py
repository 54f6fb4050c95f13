"""The engine: the only code that runs the model.

One process, one device, two lanes (``server.engine.lane.Lane``). At start a loader thread loads the
backbone, warms it up and measures it: what an image and a prompt cost to encode (admission in
seconds) and what a backward pass keeps (admission in bytes). Then the zero-shot lane encodes up to
``max_batch_size`` images of any requests in one forward pass, and the adaptation lane adapts up to
``adapt_max_batch`` images of requests with the same method and options together; both run batches
through ``server.engine.runner.Runner``. Callers submit ``Work`` and await the result.

Admission: a full zero-shot queue raises ``Overloaded``. An adaptation request is admitted when its
estimated cost fits in the lane's budget beside the work already admitted; otherwise it is served
zero-shot with ``skipped = "overload"``. Class text not yet cached is tokenized by the service, off the
lanes, and priced: the zero-shot lane encodes ``TEXT_CHUNK`` prompts of it between image batches and takes
at most ``text_budget_s`` of it at once (an idle lane takes any); an adaptation request pays for its own.
Deadlines and disconnects are checked before a job runs, between text chunks and between adaptation steps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import torch

from adapters import Stopped, UnsupportedModel
from server.clip.backbone import Backbone
from server.clip.cache import split_text_budget
from server.clip.probes import ActivationBytes
from server.engine.admission import CostModel, MemoryModel, default_memory_budget
from server.engine.classes import ClassFeatures, ClassText, TextBuild
from server.engine.lane import Lane
from server.engine.resident import ResidentAdapters
from server.engine.runner import Runner
from server.engine.work import Demand, Job, JobOutput, Work
from server.errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("ttaserve.engine")

LOADER_THREAD = "tta-load"  # loads, warms up and measures the model before the lanes start


def _adapter_key(job: Job) -> tuple[str, float] | None:
    return job.work.adapter.key if job.work.adapter is not None else None


class Engine:
    """Owns the device: loads the backbone and runs every job on its two lanes."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        load: Callable[[], Backbone],
        on_fatal: Callable[[BaseException], None] | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self._load = load
        self.on_fatal = on_fatal  # called (from the loader thread) when the model cannot be loaded
        self.backbone: Backbone | None = None
        self.runner: Runner | None = None
        self.load_error: BaseException | None = None
        self.costs = CostModel()  # prices adaptation work for admission; measured once the model is loaded
        self.pending_s = 0.0  # estimated seconds of admitted, unfinished adaptation work
        # Few-shot adapters loaded on the device, shared by the lanes (keyed by their bytes' sha256).
        self.adapters = ResidentAdapters(
            settings.adapter_cache_bytes,
            lambda: self.backbone.device if self.backbone else torch.device("cpu"),
            on_load=metrics.adapter_loads.inc,
        )
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._loader = threading.Thread(target=self._start_lanes, name=LOADER_THREAD, daemon=True)
        self.zero_shot_lane = Lane(
            "zero-shot",
            self._cond,
            self._run_zero_shot,
            limit=lambda: settings.max_batch_size,
            delay_s=lambda: settings.max_batch_delay_ms / 1000,
            on_change=self._gauge_queue,
        )
        self.adaptation_lane = Lane(
            "adapt",
            self._cond,
            self._run_adaptation,
            limit=lambda: settings.adapt_max_batch,
            delay_s=lambda: settings.max_batch_delay_ms / 1000,
            fits=lambda first, job: (
                job.work.method is first.work.method
                and job.work.options == first.work.options
                and _adapter_key(job) == _adapter_key(first)
            ),
            on_change=self._gauge_queue,
        )

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model and start the lanes, in the background."""
        self._loader.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, let the lanes finish what they run, fail what is still queued."""
        with self._cond:
            self._stopping = True
            self._ready.clear()
            pending = self.zero_shot_lane.stop() + self.adaptation_lane.stop()
        for job in pending:
            job.fail(NotReady("the server is shutting down"))
        for lane in (self.zero_shot_lane, self.adaptation_lane):
            lane.join(timeout)
        self.metrics.queue_depth.set(0)

    @property
    def queue_depth(self) -> int:
        return len(self.zero_shot_lane) + len(self.adaptation_lane)

    def _start_lanes(self) -> None:
        try:
            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)
            started = time.monotonic()
            backbone = self._load()
            backbone.warm_up()
            backbone.measure_fingerprint()
            self.costs = CostModel.measure(backbone)
            budget = self.settings.adapt_memory_bytes or default_memory_budget(backbone.device)
            memory = MemoryModel(ActivationBytes.measure(backbone), budget)
            self.metrics.adapt_memory_budget.set(budget)
            a = memory.activations
            log.info(
                "model loaded and warmed up in %.2f s (%.1f ms per image, %.2f ms per prompt; activations "
                "kept for a backward pass: %.1f MiB per image, %.1f KiB per prompt token; adaptation memory "
                "budget %.0f MiB)",
                time.monotonic() - started,
                self.costs.image_s * 1e3,
                self.costs.prompt_s * 1e3,
                a.image / 2**20,
                a.prompt_token / 2**10,
                budget / 2**20,
            )
        except BaseException as exc:  # noqa: BLE001 - reported through /readyz and on_fatal
            self.load_error = exc
            log.error("model failed to load: %s", exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        self.backbone = backbone
        self.runner = Runner(
            backbone,
            ClassFeatures(backbone, split_text_budget(self.settings.text_cache_bytes)[0]),
            self.costs,
            memory,
            self.metrics,
            self.settings.adapt_max_batch,
            self.adapters,
        )
        self.zero_shot_lane.start()
        self.adaptation_lane.start()
        self._ready.set()

    # -- admission ------------------------------------------------------------------------------
    def _admits(self, cost_s: float, timeout_s: float) -> bool:
        """Whether the adaptation lane takes work of ``cost_s`` seconds that must end within ``timeout_s``.

        An idle lane takes anything (the deadline still applies); a busy one what fits beside its
        admitted work within the budget and the request's own deadline. The caller holds the lock.
        """
        if not len(self.adaptation_lane) and self.pending_s <= 0:
            return True
        if len(self.adaptation_lane) >= self.settings.max_queue_size:
            return False
        budget = self.settings.adapt_budget_s or self.settings.request_timeout_s
        return self.pending_s + cost_s <= min(budget, timeout_s)

    def _estimate_s(self, demand: Demand) -> float:
        return self.costs.estimate_s(demand.method, demand.options, demand.n_images, demand.n_classes)

    def check_capacity(self, adaptation: Demand | None = None, timeout_s: float = 0.0) -> None:
        """Raise NotReady or Overloaded now, so a request that would be refused is not decoded first.

        An ``adaptation`` request is refused only when it would be served zero-shot and the zero-shot
        lane is full too.
        """
        if not self.ready:
            raise NotReady("the model is still loading; retry shortly", retry_after_s=1)
        if len(self.zero_shot_lane) < self.settings.max_queue_size:
            return
        if adaptation is not None:
            with self._cond:
                if self._admits(self._estimate_s(adaptation), timeout_s):
                    return
        raise Overloaded(
            f"the queue is full ({self.settings.max_queue_size} jobs waiting); retry later",
            code="queue_full",
            retry_after_s=self.settings.retry_after_s,
        )

    def check_text_capacity(self, n_prompts: int, n_labels: int) -> None:
        """Raise Overloaded when the zero-shot lane has more class text to encode than ``TTA_TEXT_BUDGET_S``
        beside this request's ``n_prompts``. An idle lane takes any build. Checked before the request's
        prompts are tokenized, and again when it is queued."""
        text_s = n_prompts * self.costs.prompt_s
        with self._cond:
            prompts = sum(j.build.remaining for j in self.zero_shot_lane.jobs() if j.build is not None)
        pending = prompts * self.costs.prompt_s
        if pending > 0 and pending + text_s > self.settings.text_budget_s:
            raise Overloaded(
                f"the server is encoding {pending:.1f} s of other label sets' text; this request's {n_labels} labels "
                f"need about {text_s:.1f} s more, over the {self.settings.text_budget_s:g} s budget; retry later "
                "(a label set, once encoded, is cached)",
                code="text_queue_full",
                retry_after_s=self.settings.retry_after_s,
            )

    def text_cached(self, work_text: ClassText) -> bool:
        """Whether ``work_text``'s class features are cached (then nothing is tokenized for them)."""
        return self.runner is not None and self.runner.classes.cached(work_text)

    def start_text(self, work_text: ClassText) -> TextBuild:
        """Tokenize ``work_text``'s prompts (from any thread but a lane's: the service's decode pool)."""
        assert self.runner is not None
        return self.runner.classes.start(work_text)

    # -- submitting -----------------------------------------------------------------------------
    async def run(self, work: Work, timeout_s: float) -> JobOutput:
        """Queue ``work`` and wait for it; raises Overloaded, NotReady, DeadlineExceeded or ClientClosed.

        Work with ``originals`` is adapted in the adaptation lane, unless the lane is over its budget:
        then it runs zero-shot and its output says ``skipped = "overload"``. Cancelling the await (the
        caller went away) stops the work before it runs or between adaptation steps.
        """
        loop = asyncio.get_running_loop()
        job = Job(work, loop.create_future(), loop, deadline=time.monotonic() + timeout_s, adapts=work.adapts)
        if work.text_build is not None and self.runner is not None and not self.runner.classes.cached(work.class_text):
            job.build = work.text_build
        text_s = job.build.remaining * self.costs.prompt_s if job.build is not None else 0.0
        with self._cond:
            if job.adapts:
                job.cost_s = self._estimate_s(work.demand) + text_s  # the adaptation lane builds its classes whole
                if self.ready and self._admits(job.cost_s, timeout_s):
                    self.adaptation_lane.put(job)
                    self.pending_s += job.cost_s
                    self.metrics.adapt_pending.set(self.pending_s)
                else:
                    job.adapts, job.skipped, job.cost_s = False, "overload", 0.0
            if not job.adapts:
                self.check_capacity()
                if job.build is not None:
                    self.check_text_capacity(job.build.remaining, len(work.labels))
                self.zero_shot_lane.put(job)
            self._gauge_queue()
        if job.skipped:
            self.metrics.adapt_skipped.labels(reason=job.skipped).inc(job.n_images)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=timeout_s)
        except asyncio.TimeoutError:
            job.deadline = min(job.deadline, time.monotonic())  # stop it now, as past its deadline, not cancelled
            raise DeadlineExceeded(f"the request did not finish within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            job.cancelled = True  # the client went away: do not spend the device on it
            raise

    # -- the lanes' batches ---------------------------------------------------------------------
    def _gauge_queue(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth)

    def _live(self, batch: list[Job]) -> list[Job]:
        """The jobs still worth running; the others are failed (deadline) or dropped (client gone)."""
        live = []
        for job in batch:
            if job.future.done():
                continue
            if job.stopped():
                job.fail(
                    job.stop_error()
                    if job.cancelled
                    else DeadlineExceeded("the request waited in the queue past its deadline")
                )
                continue
            live.append(job)
        return live

    def _run_zero_shot(self, batch: list[Job]) -> None:
        """Answer the jobs whose class features are ready; encode one chunk of the first unfinished build and put
        the jobs still building back in the queue, so a large label set never holds the lane for long."""
        live = self._live(batch)
        assert self.runner is not None
        classes = self.runner.classes
        building = [j for j in live if j.build is not None and j.build.remaining and not classes.cached(j.build.text)]
        ready = [j for j in live if j not in building]
        if ready:
            for job, output in zip(ready, self.runner.zero_shot(ready), strict=True):
                job.resolve(output)
        if not building:
            return
        first = building[0].build
        assert first is not None
        classes.step(first)
        with self._cond:
            for job in building:
                if not self.zero_shot_lane.requeue(job):
                    job.fail(NotReady("the server is shutting down"))

    def _run_adaptation(self, batch: list[Job]) -> None:
        try:
            self._adapt(self._live(batch))
        finally:
            with self._cond:
                self.pending_s = max(0.0, self.pending_s - sum(job.cost_s for job in batch))
                if not len(self.adaptation_lane):
                    self.pending_s = 0.0  # nothing admitted is left: no estimate drift carries over
                self.metrics.adapt_pending.set(self.pending_s)

    def _adapt(self, live: list[Job]) -> None:
        """Adapt the images of ``live`` together; if a stacked batch fails, each job is retried alone."""
        if not live:
            return
        assert self.runner is not None
        method = live[0].work.method
        try:
            outputs = self.runner.adapt(live)
        except Stopped as exc:  # raised only once every image's caller is gone
            log.info(
                "adaptation of %d request(s) with %s %s: %s",
                len(live),
                method.name,
                exc,
                "the client went away" if all(j.cancelled for j in live) else "past the deadline",
            )
            for job in live:
                job.fail(job.stop_error())
            return
        except Exception as exc:
            if len(live) > 1:  # find the job that cannot run, without failing the others
                log.warning(
                    "a stacked adaptation batch of %d jobs failed (%s); running them one by one", len(live), exc
                )
                for job in live:
                    self._adapt([job])
            elif isinstance(exc, UnsupportedModel):  # a method this model cannot run
                live[0].fail(InvalidInput(str(exc), code="method_unsupported"))
            else:
                log.exception("adaptation with %s failed", method.name)
                live[0].fail(exc)
            return
        for job in live:
            output = outputs.get(id(job))
            if output is None or job.stopped():
                job.fail(job.stop_error())
            else:
                job.resolve(output)

    # -- gauges ---------------------------------------------------------------------------------
    def refresh_gauges(self) -> None:
        """Set the gauges that are read rather than counted: queue depth, pending work, GPU memory."""
        self._gauge_queue()
        self.metrics.adapt_pending.set(self.pending_s)
        self.metrics.adapter_bytes.set(self.adapters.bytes)
        backbone = self.backbone
        if backbone is not None and backbone.device.type == "cuda" and self.runner is not None:
            self.metrics.gpu_memory_allocated.set(torch.cuda.memory_allocated(backbone.device))
            self.metrics.gpu_memory_peak.set(
                max(self.runner.gpu_peak_bytes, torch.cuda.max_memory_allocated(backbone.device))
            )
