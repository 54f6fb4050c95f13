"""``/v1/models`` and ``/v1/methods``: what is loaded, and what a request may ask for."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server.api.deps import RuntimeDep, SettingsDep
from server.service.discovery import methods_info, model_info

router = APIRouter(tags=["discovery"])


@router.get("/v1/models")
def list_models(runtime: RuntimeDep) -> dict[str, Any]:
    """The loaded model (one per process), with its device, precision and shape."""
    return {"models": [model_info(runtime.spec, runtime.engine, runtime.label_sets, runtime.calibration)]}


@router.get("/v1/methods")
def list_methods(settings: SettingsDep) -> dict[str, Any]:
    """Every test-time method with its options schema and the server limits that bound a request."""
    return methods_info(settings)
