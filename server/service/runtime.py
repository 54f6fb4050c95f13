"""One server process's parts, built from the settings and opened and closed as one.

``Runtime.open`` checks the configuration, opens the store, starts the engine (which loads the model in
the background) and builds the services on them; ``close`` stops them in reverse. The HTTP app opens
one in its lifespan; the accuracy harness and other in-process tools open their own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters import method_names
from server.clip.backbone import Backbone, load_backbone
from server.clip.spec import ModelSpec, cuda_unavailable_reason, resolve_device, resolve_model
from server.clip.templates import TEMPLATE_SETS
from server.engine import Engine
from server.errors import ConfigError, NotReady
from server.metrics import Metrics
from server.service.adapters import AdapterRegistry
from server.service.calibration import Calibration, FittedCalibrations
from server.service.classify import ClassifyService
from server.service.job_runner import JobRunner
from server.service.jobs import Jobs
from server.service.label_sets import LabelSets, shipped_label_sets
from server.service.monitoring import AccuracyEstimate
from server.service.recalibration import Recalibration
from server.service.sessions import Sessions
from server.settings import Settings
from server.storage import Store, open_store

log = logging.getLogger("ttaserve")

Loader = Callable[[Settings, ModelSpec], Backbone]
StoreOpener = Callable[[Settings], Store]

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


def check_settings(settings: Settings) -> ModelSpec:
    """Everything about the configuration that can be checked without loading weights (the methods, the
    templates, the device, the model and its card, the data directory's store); raises ConfigError."""
    if settings.default_method not in method_names():
        raise ConfigError(
            f"TTA_DEFAULT_METHOD={settings.default_method!r} is not a method; known: {', '.join(method_names())}"
        )
    if settings.default_templates not in TEMPLATE_SETS:
        raise ConfigError(
            f"TTA_DEFAULT_TEMPLATES={settings.default_templates!r} is not a template set; "
            f"known: {', '.join(sorted(TEMPLATE_SETS))}"
        )
    resolve_device(settings.device)
    spec = resolve_model(settings)
    Calibration.from_card(spec.card)  # a malformed confidence model stops start-up, naming the card
    open_store(settings).close()  # creates it, migrates it, or refuses one from a newer server
    return spec


@dataclass
class Runtime:
    """The engine, the store and the services of one process."""

    settings: Settings
    metrics: Metrics
    spec: ModelSpec
    engine: Engine
    store: Store
    label_sets: LabelSets
    calibration: Calibration
    classifier: ClassifyService
    recalibration: Recalibration
    decode_pool: ThreadPoolExecutor
    sessions: Sessions
    adapters: AdapterRegistry
    jobs: Jobs

    @classmethod
    def open(
        cls,
        settings: Settings,
        metrics: Metrics | None = None,
        load: Loader = load_backbone,
        on_fatal: Callable[[BaseException], None] | None = None,
        store: StoreOpener = open_store,
    ) -> Runtime:
        """Check the settings, open the store, start loading the model; raises ConfigError on a bad setting.

        ``load`` replaces ``load_backbone`` (tests use it to hold or break loading); ``on_fatal`` is called
        if the model then fails to load; ``store`` replaces ``open_store`` (tests use it to fill or lock the
        store's disk).
        """
        spec = check_settings(settings)
        metrics = metrics or Metrics()
        device = resolve_device(settings.device)
        if settings.device == "auto" and device.type == "cpu":
            log.warning(
                "TTA_DEVICE=auto is running on the CPU, not a GPU: %s. Set TTA_DEVICE=cpu to choose the CPU on "
                "purpose, or TTA_DEVICE=cuda to refuse to start without a GPU.",
                cuda_unavailable_reason() or "no CUDA device",
            )
        log.info("effective configuration: %s", json.dumps(settings.masked(), sort_keys=True))
        if spec.is_demo:
            log.warning(
                "serving the built-in demo model (%s): a tiny CLIP trained on synthetic shape images, useful to "
                "try the API, not for real photos. Choose a real model with TTA_MODEL, e.g. "
                "TTA_MODEL=ViT-B-16-quickgelu TTA_PRETRAINED=openai, or TTA_MODEL=local-dir:/path/to/model",
                spec.display,
            )
        shipped = shipped_label_sets(spec.card, settings)
        calibration = Calibration.from_card(spec.card)
        opened = store(settings)
        engine = Engine(settings, metrics, lambda: load(settings, spec), on_fatal=on_fatal)
        metrics.model_info.labels(
            model=spec.display, pretrained=spec.pretrained or "", device=str(device), precision=settings.precision
        ).set(1)
        estimate = AccuracyEstimate(metrics, settings.accuracy_window)
        label_sets = LabelSets(opened, shipped, settings)
        fitted = FittedCalibrations(opened, label_sets, calibration, engine)
        label_sets.on_delete += [estimate.forget, fitted.forget]
        decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="tta-decode")
        sessions = Sessions(settings, metrics, store=opened)
        adapters = AdapterRegistry(opened, engine, settings)
        classifier = ClassifyService(
            settings,
            spec,
            engine,
            label_sets,
            fitted,
            metrics,
            decode_pool,
            estimate,
            sessions=sessions,
            adapters=adapters,
        )
        recalibration = Recalibration(settings, label_sets, fitted, classifier, engine)
        jobs = Jobs(opened, label_sets, JobRunner(opened, settings), settings)
        engine.start()
        jobs.runner.start()
        return cls(
            settings,
            metrics,
            spec,
            engine,
            opened,
            label_sets,
            calibration,
            classifier,
            recalibration,
            decode_pool,
            sessions,
            adapters,
            jobs,
        )

    def close(self) -> None:
        self.jobs.runner.close()  # running workers stopped, their jobs failed as interrupted, before the store closes
        self.recalibration.cancel()
        self.engine.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    def readiness(self) -> None:
        """Return when the model is loaded and warm; raise NotReady saying why not."""
        engine = self.engine
        if engine.ready:
            return
        if engine.load_error is not None:
            raise NotReady(f"the model failed to load: {engine.load_error}", code="load_failed")
        raise NotReady("the model is loading", retry_after_s=1)

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of this process's metrics, gauges refreshed."""
        self.engine.refresh_gauges()
        return generate_latest(self.metrics.registry)
