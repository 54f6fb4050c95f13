"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.api.deps import DrainDep, RuntimeDep
from server.api.openapi import errors
from server.service.runtime import METRICS_CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers. Does not look at the model."""
    return {"status": "ok"}


@router.get("/readyz", responses=errors(503))
def readyz(runtime: RuntimeDep, drain: DrainDep) -> dict[str, str]:
    """Readiness: 200 once the model is loaded and a warm-up pass has run; 503 before, and from the moment a
    drain begins (``shutting_down``)."""
    drain.check()
    runtime.readiness()
    return {"status": "ready"}


@router.get("/metrics")
def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics in the text exposition format."""
    return Response(runtime.metrics_text(), media_type=METRICS_CONTENT_TYPE)
