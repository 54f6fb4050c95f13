"""The application factory: ``create_app(settings)`` builds a FastAPI app; nothing happens at import.

The lifespan resolves the model (failing fast on a bad configuration), opens the store, and starts
the engine, which loads and warms the model on its own thread while ``/healthz`` already answers
and ``/readyz`` says 503.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from adapters import method_names
from server.backbone import Backbone, ModelSpec, resolve_device, resolve_model
from server.engine import Engine
from server.errors import ConfigError, install_handlers
from server.inputs import validate_labels
from server.logs import install_record_factory
from server.metrics import Metrics
from server.middleware import RequestContext
from server.routes import router
from server.schemas import ClassifyRequest
from server.settings import Settings
from server.store import LabelSet, Store
from server.templates import TEMPLATE_SETS

log = logging.getLogger("ttaserve")

Loader = Callable[[Settings, ModelSpec], Backbone]


def _model_label_sets(spec: ModelSpec, settings: Settings) -> dict[str, LabelSet]:
    """Label sets a model ships in its ttaserve.json, served read-only beside the stored ones."""
    out = {}
    for name, entry in (spec.metadata.get("label_sets") or {}).items():
        labels = validate_labels(list(entry.get("labels", [])), settings, where=f"label_sets.{name}.labels")
        templates = tuple(entry["templates"]) if entry.get("templates") else None
        out[name] = LabelSet(name, labels, templates, entry.get("descriptions"), created_at=0.0, source="model")
    return out


def _temperatures(spec: ModelSpec) -> dict[str, float]:
    """Calibration temperatures per method from the model's ttaserve.json; a method without one gets 1."""
    out = {}
    for method, entry in (spec.metadata.get("calibration") or {}).items():
        temperature = float(entry.get("temperature", 1.0)) if isinstance(entry, dict) else float(entry)
        if not temperature > 0:
            raise ConfigError(f"{spec.display}: calibration temperature of {method} must be positive")
        out[method] = temperature
    return out


def check_settings(settings: Settings) -> ModelSpec:
    """Everything about the configuration that can be checked without loading weights; raises ConfigError."""
    if settings.default_method not in method_names():
        raise ConfigError(
            f"TTA_DEFAULT_METHOD={settings.default_method!r} is not a method; known: {', '.join(method_names())}")
    if settings.default_templates not in TEMPLATE_SETS:
        raise ConfigError(f"TTA_DEFAULT_TEMPLATES={settings.default_templates!r} is not a template set; "
                          f"known: {', '.join(sorted(TEMPLATE_SETS))}")
    resolve_device(settings.device)
    return resolve_model(settings)


def create_app(settings: Settings | None = None, *, load: Loader | None = None) -> FastAPI:
    """Build the app. ``load`` replaces ``Backbone.load`` (tests use it to slow or break loading)."""
    settings = settings or Settings()
    metrics = Metrics()
    loader: Loader = load or (lambda s, spec: Backbone.load(s, spec))
    install_record_factory()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        spec = check_settings(settings)
        device = resolve_device(settings.device)
        log.info("effective configuration: %s", json.dumps(settings.masked(), sort_keys=True))
        if spec.is_demo:
            log.warning(
                "serving the built-in demo model (%s): a tiny CLIP trained on synthetic shape images, useful to "
                "try the API, not for real photos. Choose a real model with TTA_MODEL, e.g. "
                "TTA_MODEL=ViT-B-16-quickgelu TTA_PRETRAINED=openai, or TTA_MODEL=local-dir:/path/to/model",
                spec.display,
            )
        store = Store(settings.data_dir / "ttaserve.db", builtin=_model_label_sets(spec, settings))
        engine = Engine(settings, metrics, lambda: loader(settings, spec))
        engine.on_fatal = getattr(app.state, "on_fatal", None)
        metrics.model_info.labels(model=spec.display, pretrained=spec.pretrained or "", device=str(device),
                                  precision=settings.precision).set(1)
        app.state.spec = spec
        app.state.calibration = _temperatures(spec)
        app.state.store = store
        app.state.engine = engine
        app.state.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="tta-decode")
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            app.state.decode_pool.shutdown(wait=False, cancel_futures=True)
            store.close()

    app = FastAPI(
        title="TTAServe",
        version="0.1.0",
        summary="Zero-shot CLIP classification with test-time adaptation.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_handlers(app)
    app.include_router(router)
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    _document_classify_body(app)
    return app


def _document_classify_body(app: FastAPI) -> None:
    """Add ClassifyRequest to the OpenAPI components: the route reads its body by hand (JSON or multipart)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("schemas", {})["ClassifyRequest"] = (
                ClassifyRequest.model_json_schema(ref_template="#/components/schemas/{model}"))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
