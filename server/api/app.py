"""The application factory: ``create_app(settings)`` builds a FastAPI app; nothing happens at import.

The lifespan opens the process's ``Runtime`` (checking the configuration, failing fast on a bad one),
whose engine loads and warms the model on its own thread while ``/healthz`` already answers and
``/readyz`` says 503; it closes the runtime on shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api.docs import install_docs
from server.api.drain import Drain
from server.api.errors import install_handlers
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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
    install_handlers(app)
    app.include_router(router)
    install_web(app)
    install_docs(app)
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes, metrics=metrics, drain=app.state.drain)
    install_openapi(app, settings)
    return app
