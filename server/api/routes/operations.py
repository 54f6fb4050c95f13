"""Liveness, readiness and Prometheus metrics: open to all, but ``/metrics`` asks for a key when
``TTA_METRICS_REQUIRE_KEY`` is set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import PlainTextResponse

from server.api.auth import authorize_metrics
from server.api.deps import DrainDep, RuntimeDep
from server.api.openapi import errors
from server.api.schemas import Status
from server.service.runtime import METRICS_CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Status)
def healthz() -> Status:
    """Liveness: the process answers. Does not look at the model."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses=errors(503))
def readyz(runtime: RuntimeDep, drain: DrainDep) -> Status:
    """Readiness: 200 once the model is loaded and a warm-up pass has run; 503 before, and from the moment a
    drain begins (``shutting_down``)."""
    drain.check()
    runtime.readiness()
    return Status(status="ready")


_METRICS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The Prometheus text exposition format, version 0.0.4.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    dependencies=[Depends(authorize_metrics)],
    # Written out: with a text/plain route, FastAPI would document the JSON error body as text/plain.
    responses=_METRICS_TEXT
    | {
        401: {
            "description": errors(401)[401]["description"],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
    },
)
def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics in the text exposition format."""
    return Response(runtime.metrics_text(), media_type=METRICS_CONTENT_TYPE)
