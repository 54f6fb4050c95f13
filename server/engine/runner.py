"""What the lanes run, without threads: a zero-shot batch, and a stacked adaptation batch with its policy.

``Runner.zero_shot`` encodes every job's images in one forward pass and classifies each job against
its own classes. ``Runner.adapt`` adapts every image of jobs that share a method and options: it
stacks images while their estimated activation bytes fit the memory budget (an image that does not
fit alone is answered zero-shot, ``"memory"``; a stacked batch that runs out of memory anyway is
retried image by image, and an image that runs out alone is answered zero-shot, ``"memory"`` too),
answers zero-shot the images whose calibrated zero-shot margin passes their request's confidence gate
(``"confident"``), and runs the rest through ``server.engine.adaptation.adapt_images``. Zero-shot
answers always come from the method's own ``predict``, the one zero-shot path. The lanes
(``server.engine.engine``) call these and hand the results to the callers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from adapters import Method, Stopped
from adapters.descriptions import DescriptionFeatures
from adapters.fewshot.apply import blend
from adapters.views import pool_views
from server.clip.backbone import Backbone
from server.clip.templates import describe
from server.engine import adapted
from server.engine.adaptation import ImageTask, adapt_images, image_seed
from server.engine.admission import CostModel, MemoryModel, gpu_peak, stack_within
from server.engine.classes import ClassFeatures, described
from server.engine.resident import ResidentAdapters
from server.engine.work import ImageReport, Job, JobOutput, Work
from server.metrics import Metrics

log = logging.getLogger("ttaserve.engine")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device (or the host, for the CPU) could not allocate memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_cached_memory(device: torch.device) -> None:
    """Hand the allocator's cached blocks back after an out-of-memory error, so a smaller retry can fit."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


Image = tuple[Job, int]  # an image: its job and its index in the job
Answer = tuple[torch.Tensor, ImageReport]  # an image's final logits [C] and its report


class Runner:
    """Runs batches on the backbone; every method call that touches the device goes through here."""

    def __init__(
        self,
        backbone: Backbone,
        classes: ClassFeatures,
        costs: CostModel,
        memory: MemoryModel,
        metrics: Metrics,
        adapt_max_batch: int,
        adapters: ResidentAdapters | None = None,
    ):
        self.backbone = backbone
        self.classes = classes
        self.costs = costs
        self.memory = memory
        self.metrics = metrics
        self.adapt_max_batch = adapt_max_batch
        self.adapters = adapters if adapters is not None else ResidentAdapters(0, lambda: backbone.device)
        self.gpu_peak_bytes = 0  # the most GPU memory held since start, across the stacked batches' measurements

    # -- zero-shot ------------------------------------------------------------------------------
    def zero_shot(self, jobs: list[Job]) -> list[JobOutput]:
        """Every job's images in one encoder pass, each job classified against its own classes."""
        backbone = self.backbone
        images = torch.cat([job.work.images for job in jobs])  # [B, 3, H, W]
        started = time.monotonic()
        feats = backbone.encode_images(images)  # [B, D]
        backbone.sync()
        encode_s = time.monotonic() - started
        self.metrics.batch_size.observe(images.shape[0])
        outputs, offset = [], 0
        for job in jobs:
            t0 = time.monotonic()
            work = job.work
            classes = self.classes.features(work.class_text, job.build)  # [C, D]
            mine = feats[offset : offset + job.n_images]  # [N, D]
            logits = self._pooled(work.method, mine, classes, work)  # [N, C]; [1, C] for a video
            routes, zero_shot, reports = None, None, None
            if work.adapter is not None:  # answered through the adapter; the frozen model's is the zero-shot view
                zero_shot = logits
                if work.adapter.routed:
                    logits, routes = adapted.routed(self.adapters, backbone, work, mine, classes)
                else:
                    named = adapted.named(self.adapters, backbone, work, mine, classes)
                    logits = self._pooled(work.method, *named, work)
            offset += job.n_images
            if work.session is not None:  # on this lane thread, in the order the session's requests came
                zero_shot = logits
                logits, reports = work.session.apply(mine, logits, self.backbone.logit_scale)
            timings = {"queue": started - job.enqueued_at, "encode": encode_s, "classify": time.monotonic() - t0}
            outputs.append(
                JobOutput(
                    logits,
                    timings,
                    int(images.shape[0]),
                    skipped=job.skipped,
                    zero_shot_logits=zero_shot,
                    session=reports,
                    routes=routes,
                )
            )
        self._gauge_text_cache()
        return outputs

    def _gauge_text_cache(self) -> None:
        self.metrics.text_cache_bytes.set(self.classes.bytes + self.classes.backbone.prompt_cache.bytes)

    def _pooled(self, method: Method[Any], feats: torch.Tensor, classes: torch.Tensor, work: Work) -> torch.Tensor:
        """``_predict``, with a video's frames [T, D] pooled into one answer [1, C]."""
        if work.pooling == "max":  # the max over the frames' logits, class by class
            return self._predict(method, feats, classes, work).max(0, keepdim=True).values
        if work.pooling == "mean":  # the mean of the frames' embeddings, renormalised
            return self._predict(method, pool_views(feats, [slice(None)]), classes, work)
        return self._predict(method, feats, classes, work)

    def _extras(self, work: Work) -> tuple[DescriptionFeatures | None, torch.Tensor | None]:
        """What adapting the work's images may need besides its classes: its label set's description
        features (the description head, MSTA's consistency) and the anchor texts (``anchor_kl``)."""
        given = described(work.descriptions) if work.options.descriptions.wanted else None
        descriptions = None
        if given:  # a clone outside inference mode, as for the classes: the consistency term differentiates with it
            cached = self.classes.descriptions(work.labels, given)
            descriptions = DescriptionFeatures(cached.means.clone(), cached.present.clone())
        anchors = None
        if work.options.regularizers.anchor_kl:
            extra = tuple(describe(label, d) for label, ds in zip(work.labels, given or (), strict=False) for d in ds)
            anchors = self.classes.anchors(extra).clone()
        return descriptions, anchors

    def _predict(self, method: Method[Any], feats: torch.Tensor, classes: torch.Tensor, work: Work) -> torch.Tensor:
        """[N, D] image features against [C, D] classes: the method's zero-shot logits [N, C], float32 on the CPU."""
        with torch.inference_mode():
            return method.predict(feats, classes, self.backbone.logit_scale, work.options).float().cpu()

    # -- adaptation -----------------------------------------------------------------------------
    def adapt(self, jobs: list[Job]) -> dict[int, JobOutput]:
        """Adapt every image of ``jobs`` (same method and options), stacked within the memory budget.

        Returns the output of each job (by ``id``) whose images all finished; a job stopped part-way
        (its caller gone) has none. Raises ``adapters.Stopped`` once every image's caller is gone.
        """
        backbone = self.backbone
        started = time.monotonic()
        method = jobs[0].work.method
        options = jobs[0].work.options
        # A clone outside inference mode: the cached features are inference tensors, which autograd refuses.
        classes: dict[int, torch.Tensor] = {}  # each [C, D]
        for job in jobs:
            with contextlib.suppress(Stopped):  # its caller went away while its text was encoded: no output
                frozen = self.classes.features(job.work.class_text, job.build, stop=job.stopped)
                use = job.work.adapter
                if use is not None:  # adaptation runs on top of the adapter's text side
                    frozen = blend(
                        frozen,
                        adapted.class_side(self.adapters, backbone, use.adapters[0], job.work, frozen),
                        use.alpha,
                    )
                classes[id(job)] = frozen.clone()
        jobs = [job for job in jobs if id(job) in classes]
        if not jobs:
            raise Stopped("stopped while encoding the labels' text")
        done: dict[tuple[int, int], Answer] = {}
        needs = {id(job): self.memory.image_bytes(backbone, method, options, job.work.labels) for job in jobs}
        items = [(job, i) for job in jobs for i in range(job.work.n_answers)]
        chunks, too_big = stack_within(
            items, [needs[id(job)] for job, _ in items], self.memory.budget_bytes, self.adapt_max_batch
        )
        if too_big:
            job = too_big[0][0]
            log.warning(
                "%d image(s) of %s need about %.0f MiB each to adapt, over the %.0f MiB memory budget "
                "(TTA_ADAPT_MEMORY_BYTES): served zero-shot",
                len(too_big),
                method.name,
                needs[id(job)] / 2**20,
                self.memory.budget_bytes / 2**20,
            )
            self._answer_zero_shot(too_big, classes, done, "memory")
        for chunk in chunks:
            chunk = [(job, i) for job, i in chunk if not job.stopped()]
            if chunk:
                chunk = self._gate(chunk, classes, done)
            if not chunk:
                continue
            self._adapt_chunk(chunk, classes, needs, done)
        elapsed = time.monotonic() - started
        if not any(job.work.gate is not None for job in jobs):  # a gated batch skipped work it was priced for
            self.costs.learn(method.name, sum(job.cost_s for job in jobs), elapsed)
        outputs = {}
        for job in jobs:
            if any((id(job), i) not in done for i in range(job.work.n_answers)):
                continue  # stopped part-way: its caller is gone
            logits, reports = zip(*(done[(id(job), i)] for i in range(job.work.n_answers)), strict=True)
            for report in reports:
                report.memory_bytes = int(needs[id(job)])
            timings = {"queue": started - job.enqueued_at, "adapt": elapsed}
            outputs[id(job)] = JobOutput(
                torch.stack(logits), timings, max(r.batch_images for r in reports), list(reports)
            )
        self._gauge_text_cache()
        return outputs

    def _adapt_chunk(
        self,
        chunk: list[Image],
        classes: dict[int, torch.Tensor],
        needs: dict[int, float],
        done: dict[tuple[int, int], Answer],
    ) -> None:
        """Adapt the images of ``chunk`` together. If the device runs out of memory (the estimate was wrong),
        each image is tried alone; one that runs out alone is answered zero-shot (``skipped = "memory"``)."""
        backbone = self._image_side(chunk[0][0].work)  # the jobs of a batch share their adapter's vision side
        method, options = chunk[0][0].work.method, chunk[0][0].work.options
        extras = {id(job): self._extras(job.work) for job, _ in chunk}
        tasks = [self._task(job, i, classes[id(job)], *extras[id(job)]) for job, i in chunk]
        try:
            with gpu_peak(backbone.device) as peak:
                outs = adapt_images(backbone, method, options, tasks)
        except Exception as exc:
            if not out_of_memory(exc):
                raise
            del tasks
            free_cached_memory(backbone.device)
            if len(chunk) > 1:
                log.warning("adapting %d images together ran out of memory (%s); trying each alone", len(chunk), exc)
                for item in chunk:
                    if not item[0].stopped():
                        self._adapt_chunk([item], classes, needs, done)
                return
            log.warning("adapting one image with %s ran out of memory alone (%s): served zero-shot", method.name, exc)
            self._answer_zero_shot(chunk, classes, done, "memory")
            return
        if peak:
            self.gpu_peak_bytes = max(self.gpu_peak_bytes, peak["before"])
            self.memory.learn(method.name, sum(needs[id(job)] for job, _ in chunk), peak["rise"])
        for (job, i), out in zip(chunk, outs, strict=True):
            done[(id(job), i)] = out
        self.metrics.adapt_batch_size.observe(len(chunk))

    def _image_side(self, work: Work) -> Backbone:
        """What encodes an adapting work's images: the frozen backbone, or its adapter's vision side."""
        return adapted.image_side(self.backbone, work.adapter) if work.adapter is not None else self.backbone

    @staticmethod
    def _task(
        job: Job,
        i: int,
        classes: torch.Tensor,
        descriptions: DescriptionFeatures | None = None,
        anchors: torch.Tensor | None = None,
    ) -> ImageTask:
        """Image ``i`` of an adapting job, with its own generator seeded from the request's seed."""
        originals = job.work.originals
        assert originals is not None, "the adaptation lane runs only work with decoded originals"
        generator = torch.Generator().manual_seed(image_seed(job.work.seed, i))
        # A video's task is its clip: the frames [T, 3, H0, W0] and their base views [T, 3, h, w].
        base = job.work.images if job.work.pooling else job.work.images[i]
        return ImageTask(originals[i], base, classes, job.work.labels, generator, job.stopped, descriptions, anchors)

    def _gate(
        self, chunk: list[Image], classes: dict[int, torch.Tensor], done: dict[tuple[int, int], Answer]
    ) -> list[Image]:
        """Answer zero-shot the gated images whose calibrated margin passes their gate; return the others."""
        gated = [(job, i) for job, i in chunk if job.work.gate is not None]
        if not gated:
            return chunk

        def confident(job: Job, logits: torch.Tensor) -> bool:
            gate, margin = job.work.gate, job.work.gate_margin
            return gate is not None and margin is not None and margin(logits) >= gate

        answered = self._answer_zero_shot(gated, classes, done, "confident", when=confident)
        return [(job, i) for job, i in chunk if (id(job), i) not in answered]

    def _answer_zero_shot(
        self,
        items: list[Image],
        classes: dict[int, torch.Tensor],
        done: dict[tuple[int, int], Answer],
        reason: str,
        when: Callable[[Job, torch.Tensor], bool] = lambda job, logits: True,
    ) -> set[tuple[int, int]]:
        """Answer ``items`` (those ``when`` picks from their zero-shot logits) zero-shot, skipped for ``reason``."""
        t0 = time.monotonic()
        # A video's frames are pooled by the mean of their embeddings, as its adapted views are.
        frames = [job.work.images if job.work.pooling else job.work.images[i : i + 1] for job, i in items]
        encoded = self._image_side(items[0][0].work).encode_images(torch.cat(frames))  # [sum T, D]
        offsets = torch.tensor([0] + [f.shape[0] for f in frames]).cumsum(0).tolist()
        feats = torch.cat(
            [
                pool_views(encoded, [slice(a, b)]) if job.work.pooling else encoded[a:b]
                for (job, _), a, b in zip(items, offsets[:-1], offsets[1:], strict=True)
            ]
        )  # [N, D]
        answered = set()
        for row, (job, i) in enumerate(items):
            logits = self._predict(job.work.method, feats[row : row + 1], classes[id(job)], job.work)[0]  # [C]
            if when(job, logits):
                answered.add((id(job), i))
                done[(id(job), i)] = (logits, ImageReport(logits, 0, 1, 1, time.monotonic() - t0, skipped=reason))
        if answered:
            self.metrics.adapt_skipped.labels(reason=reason).inc(len(answered))
        return answered
