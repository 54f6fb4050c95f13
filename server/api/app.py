"""The application factory: ``create_app(settings)`` builds a FastAPI app; nothing happens at import.

The lifespan opens the process's ``Runtime`` (checking the configuration, failing fast on a bad one),
whose engine loads and warms the model on its own thread while ``/healthz`` already answers and
``/readyz`` says 503; it closes the runtime on shutdown. The API keys are read when the app is built (a
bad one raises ConfigError), the rate limits and CORS set up from the settings.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.api.auth import Keys, exposed_without_keys
from server.api.docs import install_docs
from server.api.drain import Drain
from server.api.errors import install_handlers
from server.api.limits import TokenBuckets
from server.api.middleware import RequestContext
from server.api.openapi import install_openapi, operation_id
from server.api.routes import router
from server.api.routes.web import install_web
from server.clip.backbone import load_backbone
from server.logs import install_record_factory
from server.metrics import Metrics
from server.service.runtime import Loader, Runtime, StoreOpener
from server.settings import Settings
from server.storage import open_store

log = logging.getLogger("ttaserve")


def create_app(
    settings: Settings | None = None, *, load: Loader | None = None, store: StoreOpener | None = None
) -> FastAPI:
    """Build the app. ``load`` replaces ``load_backbone`` (tests use it to hold or break loading), ``store``
    replaces ``open_store`` (tests use it to fill or lock the store's disk).

    Set ``app.state.on_fatal`` before it starts to hear of a model that fails to load (``python -m
    server`` exits then). ``app.state.drain`` (``server.api.drain.Drain``) stops it taking new work.
    """
    settings = settings or Settings()
    metrics = Metrics()
    install_record_factory()
    keys = Keys.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if exposed_without_keys(settings):
            log.warning(
                "listening on %s without API keys: anyone who can reach it may classify and change label sets; "
                "set TTA_API_KEYS and TTA_ADMIN_API_KEYS",
                settings.host,
            )
        runtime = Runtime.open(
            settings,
            metrics,
            load or load_backbone,
            on_fatal=getattr(app.state, "on_fatal", None),
            store=store or open_store,
        )
        app.state.runtime = runtime
        try:
            yield
        finally:
            runtime.close()

    app = FastAPI(
        title="TTAServe",
        version="0.1.0",
        summary="Zero-shot CLIP classification with test-time adaptation.",
        lifespan=lifespan,
        docs_url=None,  # install_docs serves both pages without a CDN
        redoc_url=None,
        generate_unique_id_function=operation_id,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.drain = Drain(settings.retry_after_s)
    app.state.keys = keys
    burst = settings.rate_limit_burst or float(settings.max_images_per_request)
    app.state.rate_limits = TokenBuckets(settings.rate_limit_rps, burst, metrics)
    install_handlers(app)
    app.include_router(router)
    install_web(app)
    install_docs(app)
    if settings.cors_origin_list:
        # Inside RequestContext: a preflight is answered here, still with a request id and a log line.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "X-Request-Timeout", "traceparent"],
            expose_headers=["X-Request-ID", "Retry-After", "Location", "WWW-Authenticate"],
            max_age=600,
        )
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes, metrics=metrics, drain=app.state.drain)
    install_openapi(app, settings)
    return app
