"""The classify pipeline, once: a validated request in, typed results out, whatever the transport.

``ClassifyService.classify`` resolves the method and the classes (labels, or a stored label set with
its templates and descriptions), checks the limits, asks the engine for capacity before any decoding,
decodes the images off the event loop, runs the work on the engine (watching for the caller going
away), then calibrates each answer, applies abstention, builds the adaptation report, and records the
request's metrics. The HTTP API, the accuracy harness and (later) the command line, jobs and sessions
all call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from adapters import Method
from adapters.losses import entropy
from adapters.views import clip_view_frames
from server.clip.spec import ModelSpec
from server.engine import ClassText, Demand, Engine, JobOutput, Work
from server.engine.work import AdapterUse
from server.errors import ClientClosed, ClientError, DeadlineExceeded, InvalidInput, NotReady, Rejected, TTAError
from server.logs import note
from server.metrics import Metrics
from server.service.adapters import AdapterChoice, AdapterRegistry
from server.service.calibration import Calibration, FittedCalibrations
from server.service.confidence import ConfidenceModel
from server.service.decoding import ImageInput, decode_images
from server.service.label_sets import LabelSets
from server.service.monitoring import AccuracyEstimate
from server.service.results import (
    Adaptation,
    AdapterReport,
    Classification,
    Ensemble,
    ModelRef,
    Result,
    RoutedAdapter,
    SessionReport,
    ZeroShotView,
)
from server.service.sessions import Opened, Sessions
from server.service.validation import (
    check_image_count,
    check_limits,
    parse_options,
    resolve_method,
    resolve_templates,
    resolve_top_k,
    validate_labels,
)
from server.service.video import VideoInput, check_video_method, clip_length, decode_video
from server.settings import Settings
from server.storage import LabelSet

DISCONNECT_POLL_S = 0.1  # how often a request waiting on the engine asks whether its caller is still there

Disconnected = Callable[[], Awaitable[bool]]
# Charges a request's cost, in images weighted by their method (``CostModel.in_images``), to its caller's
# rate limit, told whether it adapts; raises ``RateLimited`` to refuse it.
Admit = Callable[[float, bool], None]


@dataclass(frozen=True)
class ClassifyRequest:
    """What a caller asks: images, the classes (``labels`` or a ``label_set``), and how to classify them.

    Types are checked by the caller (the API's schemas); the service checks values against the limits.
    """

    images: Sequence[ImageInput]  # empty for a video request
    labels: Sequence[str] | None = None
    label_set: str | None = None
    templates: Sequence[str] | str | None = None  # a named set or templates with {} (default: the set's, the server's)
    top_k: int | None = None
    method: str | None = None  # default: TTA_DEFAULT_METHOD
    options: Mapping[str, Any] | None = None
    seed: int | None = None  # seeds the augmented views; None: a random one, reported
    compare: bool = False  # also return the zero-shot predictions
    abstain_below: float | None = None  # no label when the calibrated confidence is below this
    confidence_gate: float | None = None  # default: TTA_CONFIDENCE_GATE
    timeout_s: float | None = None  # a deadline shorter than TTA_REQUEST_TIMEOUT_S
    monitor: bool = True  # counted in its label set's accuracy estimate (not a calibration's labelled images)
    owner: str = ""  # whose label sets ``label_set`` names: the caller's API key name ('' without keys)
    video: VideoInput | None = None  # one video, answered once (then ``images`` is empty)
    session: str | None = None  # keep online state across this caller's requests with this id (zero_shot only)
    session_method: str | None = None  # the session's online method (default: TTA_SESSION_METHOD)
    adapter: AdapterChoice | None = None  # serve through a stored few-shot adapter, or route among them


@dataclass(frozen=True)
class Classes:
    labels: tuple[str, ...]
    templates: tuple[str, ...]
    descriptions: tuple[tuple[str, ...], ...] | None  # per label, from a label set with descriptions
    label_set: LabelSet | None = None  # the named label set, when the request names one


def outcome(exc: BaseException) -> str:
    """The ``outcome`` label of ``tta_requests_total`` for a request that raised ``exc``."""
    if isinstance(exc, Rejected):
        return "rejected"
    if isinstance(exc, DeadlineExceeded):
        return "timeout"
    if isinstance(exc, ClientClosed):
        return "cancelled"
    return "client_error" if isinstance(exc, ClientError) else "error"


class ClassifyService:
    """Classify images zero-shot or with test-time adaptation, on one engine."""

    def __init__(
        self,
        settings: Settings,
        spec: ModelSpec,
        engine: Engine,
        label_sets: LabelSets,
        calibrations: FittedCalibrations,
        metrics: Metrics,
        decode_pool: Executor,
        estimate: AccuracyEstimate,
        sessions: Sessions | None = None,
        adapters: AdapterRegistry | None = None,
    ):
        self.settings = settings
        self.spec = spec
        self.engine = engine
        self.label_sets = label_sets
        self.calibrations = calibrations
        self.metrics = metrics
        self.decode_pool = decode_pool
        self.estimate = estimate
        self.sessions = sessions if sessions is not None else Sessions(settings, metrics)
        self.adapters = adapters

    async def classify(
        self, req: ClassifyRequest, disconnected: Disconnected | None = None, admit: Admit | None = None
    ) -> Classification:
        """Classify ``req``'s images; ``disconnected`` says when the caller has gone (its work is then stopped).

        ``admit`` is charged the request's cost once it is found valid, before any capacity is asked for.

        Raises a ``server.errors.TTAError``: ClientError for a bad request, Rejected when the server
        cannot take it now, DeadlineExceeded, ClientClosed.
        """
        started = time.monotonic()
        method_label, result = "invalid", "error"  # a method name only once it is known to be one
        self.metrics.inflight.inc()
        try:
            method = resolve_method(req.method, self.settings)
            method_label = method.name
            classification = await self._classify(req, method, disconnected, started, admit)
            result = "success"
            return classification
        except TTAError as exc:
            result = outcome(exc)
            raise
        finally:
            self.metrics.inflight.dec()
            note(outcome=result, classify_method=method_label)  # on the request's access line
            self.metrics.requests.labels(method=method_label, outcome=result).inc()
            self.metrics.request_duration.labels(method=method_label).observe(time.monotonic() - started)

    async def _classify(
        self,
        req: ClassifyRequest,
        method: Method[Any],
        disconnected: Disconnected | None,
        started: float,
        admit: Admit | None = None,
    ) -> Classification:
        settings = self.settings
        options = parse_options(method, req.options)
        adaptive = method.name != "zero_shot"
        video = req.video
        if video is None:
            check_image_count(len(req.images), settings)
            n_inputs = len(req.images)  # what the request costs, in images
        else:
            if req.images:
                raise InvalidInput("give images or video, not both", code="images_and_video")
            n_frames = clip_length(video, settings.max_frames)
            if adaptive:
                check_video_method(method, video)
            # Zero-shot encodes each frame once; adapting encodes each view's clip_view_frames(T) frames.
            n_inputs = clip_view_frames(n_frames) if adaptive else n_frames
        classes = self._resolve_classes(req)
        if options.descriptions.consistency and not (classes.descriptions and any(classes.descriptions)):
            raise InvalidInput(
                "options.descriptions.consistency keeps each class near its descriptions: name a label_set "
                "with descriptions",
                code="invalid_options",
            )
        top_k = resolve_top_k(req.top_k, len(classes.labels), settings)
        online = None
        if req.session is not None:
            if video is not None:
                raise InvalidInput("a session keeps state per image; send images, not a video", code="invalid_session")
            online = self.sessions.resolve_method(req.session_method, method.name)
        elif req.session_method is not None:
            raise InvalidInput("session_method needs a session id (session)", code="session_method_without_session")
        if adaptive:
            check_limits(options, settings)
        # Loading an adapter may read and parse its artifact from the store: off the event loop.
        adapter = None
        if req.adapter is not None:
            adapter = await asyncio.get_running_loop().run_in_executor(self.decode_pool, self._adapter, req, method)
        timeout_s = min(req.timeout_s, settings.request_timeout_s) if req.timeout_s else settings.request_timeout_s
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        gate = req.confidence_gate if req.confidence_gate is not None else settings.confidence_gate
        if admit is not None:
            weight = self.engine.costs.in_images(method, options, len(classes.labels)) if adaptive else 1.0
            admit(n_inputs * weight, adaptive)
        # Before decoding: a request that will be refused costs no decode.
        demand = Demand(method, options, n_inputs, len(classes.labels)) if adaptive else None
        self.engine.check_capacity(demand, timeout_s)
        text = ClassText.of(classes.labels, classes.templates, classes.descriptions, options.descriptions.mix)
        cached = self.engine.text_cached(text)
        if not cached:
            self.engine.check_text_capacity(text.n_prompts, len(text.labels))
        backbone = self.engine.backbone
        if backbone is None:
            raise NotReady("the model is still loading; retry shortly", retry_after_s=1)
        t0 = time.monotonic()
        decode = (
            functools.partial(decode_images, list(req.images))
            if video is None
            else functools.partial(decode_video, video, settings.max_frames)
        )
        images, originals = await asyncio.get_running_loop().run_in_executor(
            self.decode_pool,
            decode,
            backbone.preprocess,
            backbone.image_size,
            settings.max_image_pixels,
            adaptive,
            settings.max_aspect_ratio,
        )
        decode_s = time.monotonic() - t0
        t0, build = time.monotonic(), None
        if not cached:  # tokenized here, off the engine's lanes, in the bounded decode pool
            build = await asyncio.get_running_loop().run_in_executor(self.decode_pool, self.engine.start_text, text)
        tokenize_s = time.monotonic() - t0
        models = self.calibrations.models(method.name, classes.label_set, req.owner)  # one read of the store
        work = Work(
            images,
            classes.labels,
            classes.templates,
            method,
            options,
            originals=originals,
            seed=seed,
            descriptions=classes.descriptions,
            gate=gate if adaptive else None,
            pooling=video.pooling if video is not None else None,
            gate_margin=functools.partial(Calibration.margin, models[1]) if adaptive else None,  # zero-shot's
            text_build=build,
            adapter=adapter,
        )
        opened = None
        if online is None or req.session is None:
            remaining = timeout_s - (time.monotonic() - started)
            output = await self._run(work, max(remaining, 0.001), disconnected)
        else:
            # One request of a session at a time, in arrival order: its state is updated in the engine's
            # runner, and the next request goes to the engine only once this one's update is done.
            dim = backbone.embed_dim or 512
            self.sessions.check_fits(online, len(classes.labels), dim)
            session = self.sessions.session(req.owner, req.session)
            session.waiting += 1
            try:
                await asyncio.wait_for(session.lock.acquire(), max(timeout_s - (time.monotonic() - started), 0.001))
            except asyncio.TimeoutError:
                raise DeadlineExceeded(
                    f"the request waited past its {timeout_s:g} s deadline for the requests of session "
                    f"{req.session!r} before it"
                ) from None
            finally:
                session.waiting -= 1
            try:
                opened = self.sessions.state_for(session, online, classes.labels, classes.templates, req.label_set, dim)
                work = dataclasses.replace(work, session=opened.label_state.state)
                remaining = timeout_s - (time.monotonic() - started)
                output = await self._run(work, max(remaining, 0.001), disconnected)
                self.sessions.settle(opened)
                # Written before the next request of the session may start: the store holds whole requests.
                await asyncio.get_running_loop().run_in_executor(self.decode_pool, self.sessions.persist, session)
            finally:
                session.lock.release()
        timings = {"decode": decode_s, "tokenize": tokenize_s, **output.timings}
        for stage, seconds in timings.items():
            self.metrics.stage_duration.labels(stage=stage).observe(seconds)
        timings["total"] = time.monotonic() - started
        self.metrics.images.labels(method=method.name).inc(work.n_images)
        results = self._results(output, work, models, top_k, req, seed if adaptive else None, opened)
        if req.monitor:
            self.estimate.observe(classes.label_set, [r.confidence for r in results])
        spec = self.spec
        return Classification(
            model=ModelRef(id=spec.display, pretrained=spec.pretrained, demo=spec.is_demo),
            method=method.name,
            results=results,
            timings=timings,
        )

    def _adapter(self, req: ClassifyRequest, method: Method[Any]) -> AdapterUse | None:
        """The adapter(s) the request is served through, loaded and checked against its method."""
        if req.adapter is None:
            return None
        if self.adapters is None:
            raise InvalidInput("this server keeps no adapters", code="adapter_method")
        if req.session is not None:
            raise InvalidInput(
                "a session keeps state over the frozen model's features: use a session or an adapter, not both",
                code="invalid_session",
            )
        if req.video is not None and req.adapter.ref is None:
            raise InvalidInput("routing answers per image: name one adapter for a video", code="adapter_method")
        return self.adapters.use(req.adapter, req.owner, method)

    def _resolve_classes(self, req: ClassifyRequest) -> Classes:
        """Labels, templates and, for a label set with descriptions, each label's descriptions."""
        settings = self.settings
        if req.labels is not None and req.label_set is not None:
            raise InvalidInput("give labels or label_set, not both", code="labels_and_label_set")
        if req.label_set is not None:
            label_set: LabelSet = self.label_sets.get(req.label_set, owner=req.owner)
            described = label_set.descriptions
            descriptions = tuple(tuple(described.get(label, ())) for label in label_set.labels) if described else None
            templates = resolve_templates(req.templates, settings, fallback=label_set.templates)
            return Classes(label_set.labels, templates, descriptions, label_set)
        return Classes(validate_labels(req.labels, settings), resolve_templates(req.templates, settings), None)

    async def _run(self, work: Work, timeout_s: float, disconnected: Disconnected | None) -> JobOutput:
        """Run ``work`` on the engine; if the caller goes away first, cancel it and raise ClientClosed.

        Cancelling the engine's await marks the job cancelled, so the engine drops it before it runs
        or stops it between adaptation steps.
        """
        task = asyncio.ensure_future(self.engine.run(work, timeout_s))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S if disconnected else None)
                if done:
                    return task.result()
                if disconnected is not None and await disconnected():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, TTAError):
                        await task
                    raise ClientClosed("the client closed the connection before the answer was ready")
        finally:
            if not task.done():
                task.cancel()

    def _results(
        self,
        output: JobOutput,
        work: Work,
        models: tuple[ConfidenceModel, ConfidenceModel],
        top_k: int,
        req: ClassifyRequest,
        seed: int | None,
        opened: Opened | None = None,
    ) -> list[Result]:
        """Each image's calibrated predictions, abstention, adaptation report and zero-shot view; ``models`` are
        the request's confidence models of its method and of zero-shot (``FittedCalibrations.models``)."""
        method, labels = work.method.name, work.labels
        method_model, zero_shot_model = models
        results = []
        for i in range(output.logits.shape[0]):
            logits = output.logits[i]  # [C]
            report = output.reports[i] if output.reports else None
            zs_logits = report.zero_shot_logits if report else logits
            if output.zero_shot_logits is not None:  # a session's state moved the logits
                zs_logits = output.zero_shot_logits[i]
            skipped = output.skipped or (report.skipped if report else None)
            # An image answered zero-shot is calibrated as zero-shot, whatever method was asked for.
            model = zero_shot_model if skipped else method_model
            answer = Calibration.calibrate(model, logits, zs_logits, labels, report.order if report else None, top_k)
            zero_shot = Calibration.calibrate(zero_shot_model, zs_logits, zs_logits, labels, None, top_k)
            preds, zs_preds = answer.predictions, zero_shot.predictions
            abstained = req.abstain_below is not None and answer.confidence < req.abstain_below
            entropy_before, entropy_after = float(entropy(zs_logits)), float(entropy(logits))
            adaptation = Adaptation(
                method=method,
                steps=report.steps if report else 0,
                views=report.views if report else 1,
                selected_views=report.selected_views if report else 1,
                entropy_before=entropy_before,
                entropy_after=entropy_after,
                zero_shot_label=zs_preds[0].label,
                changed=zs_preds[0].label != preds[0].label,
                seconds=report.seconds if report else output.timings.get("classify", 0.0),
                seed=seed if report else None,
                agreement=report.extra.get("agreement") if report else None,
                skipped=skipped,
                batch_images=report.batch_images if report else 1,
                memory_bytes=report.memory_bytes if report else None,
                drift=report.extra.get("drift") if report else None,
                ensemble=Ensemble(mode=work.options.ensemble.mode, **report.extra["ensemble"])
                if report and "ensemble" in report.extra
                else None,
            )
            calibrated = answer.probabilities.clamp_min(1e-12)
            answer_entropy = float(-(calibrated * calibrated.log()).sum())
            self._observe(
                method,
                answer.confidence,
                answer_entropy / math.log(len(labels)) if len(labels) > 1 else 0.0,
                abstained,
                report.seconds if report and not skipped else None,
                entropy_before - entropy_after,
                adaptation.changed,
            )
            results.append(
                Result(
                    label=None if abstained else preds[0].label,
                    confidence=answer.confidence,
                    entropy=answer_entropy,
                    abstained=abstained,
                    none_of_these=answer.none_of_these,
                    predictions=preds,
                    adaptation=adaptation,
                    zero_shot=ZeroShotView(
                        label=zs_preds[0].label, confidence=zero_shot.confidence, predictions=zs_preds
                    )
                    if req.compare
                    else None,
                    session=self._session_report(opened, output, i),
                    adapter=self._adapter_report(work, output, i),
                )
            )
        return results

    def _adapter_report(self, work: Work, output: JobOutput, i: int) -> AdapterReport | None:
        use = work.adapter
        if use is None:
            return None
        if not use.routed:
            return AdapterReport(adapter=use.refs[0], alpha="class_distance" if use.class_distance else use.alpha)
        route = output.routes[i] if output.routes else None
        self.metrics.routed_images.labels(outcome="adapter" if route and route.used else "fallback").inc()
        return AdapterReport(
            adapter=None,
            alpha=use.alpha,
            routed=[RoutedAdapter(adapter=ref, similarity=sim) for ref, sim in route.used] if route else [],
            best_similarity=route.best if route else None,
        )

    @staticmethod
    def _session_report(opened: Opened | None, output: JobOutput, i: int) -> SessionReport | None:
        if opened is None or output.session is None:
            return None
        online, label_state = output.session[i], opened.label_state
        return SessionReport(
            id=opened.session.id,
            session_method=label_state.state.name,
            entries=online.entries,
            weight=online.weight,
            requests=label_state.requests,
            disagreement=online.disagreement,
            reset=opened.reset,
        )

    def _observe(
        self,
        method: str,
        confidence: float,
        entropy_ratio: float,
        abstained: bool,
        adapt_s: float | None,
        entropy_drop: float,
        changed: bool,
    ) -> None:
        """The quality metrics of one image: its confidence, entropy (over its maximum) and abstention, and for an
        adapted one what adaptation did."""
        self.metrics.confidence.labels(method=method).observe(confidence)
        self.metrics.prediction_entropy.labels(method=method).observe(entropy_ratio)
        if abstained:
            self.metrics.abstentions.labels(method=method).inc()
        if adapt_s is not None:
            self.metrics.adapt_duration.labels(method=method).observe(adapt_s)
            self.metrics.entropy_reduction.labels(method=method).observe(entropy_drop)
            if changed:
                self.metrics.prediction_changed.labels(method=method).inc()
