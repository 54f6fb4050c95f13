"""Liveness, readiness and Prometheus metrics: open to all, but ``/metrics`` asks for a key when
``TTA_METRICS_REQUIRE_KEY`` is set."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from server.api.auth import authorize_metrics
from server.api.deps import RuntimeDep
from server.api.openapi import errors
from server.service.runtime import METRICS_CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers. Does not look at the model."""
    return {"status": "ok"}


@router.get("/readyz", responses=errors(503))
def readyz(runtime: RuntimeDep) -> dict[str, str]:
    """Readiness: 200 once the model is loaded and a warm-up pass has run; 503 before and while stopping."""
    runtime.readiness()
    return {"status": "ready"}


@router.get("/metrics", dependencies=[Depends(authorize_metrics)], responses=errors(401))
def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics in the text exposition format."""
    return Response(runtime.metrics_text(), media_type=METRICS_CONTENT_TYPE)
