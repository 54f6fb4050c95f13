"""What handlers depend on, as ``Annotated`` dependencies: the process's runtime and its parts.

The app factory puts one ``Runtime`` on ``app.state`` when its lifespan opens; a handler names what it
needs (``ClassifierDep``, ``LabelSetsDep``, ...) and FastAPI hands it over.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.api.drain import Drain
from server.api.limits import TokenBuckets
from server.errors import NotReady
from server.service.classify import ClassifyService
from server.service.label_sets import LabelSets
from server.service.recalibration import Recalibration
from server.service.runtime import Runtime
from server.settings import Settings


def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if not isinstance(runtime, Runtime):  # outside the lifespan: the app is starting or stopping
        raise NotReady("the server is not running", retry_after_s=1)
    return runtime


def get_settings(request: Request) -> Settings:
    settings = request.app.state.settings
    assert isinstance(settings, Settings)
    return settings


def get_drain(request: Request) -> Drain:
    drain = request.app.state.drain
    assert isinstance(drain, Drain)
    return drain


def accepting(drain: Annotated[Drain, Depends(get_drain)]) -> None:
    """Refuse new work (503 ``shutting_down``) while the process drains."""
    drain.check()


def get_rate_limits(request: Request) -> TokenBuckets:
    limits = request.app.state.rate_limits
    assert isinstance(limits, TokenBuckets)
    return limits


def get_classifier(runtime: Annotated[Runtime, Depends(get_runtime)]) -> ClassifyService:
    return runtime.classifier


def get_label_sets(runtime: Annotated[Runtime, Depends(get_runtime)]) -> LabelSets:
    return runtime.label_sets


def get_recalibration(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Recalibration:
    return runtime.recalibration


DrainDep = Annotated[Drain, Depends(get_drain)]
Accepting = Depends(accepting)
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ClassifierDep = Annotated[ClassifyService, Depends(get_classifier)]
LabelSetsDep = Annotated[LabelSets, Depends(get_label_sets)]
RecalibrationDep = Annotated[Recalibration, Depends(get_recalibration)]
RateLimitsDep = Annotated[TokenBuckets, Depends(get_rate_limits)]
