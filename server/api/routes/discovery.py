"""``/v1/models`` and ``/v1/methods``: what is loaded, and what a request may ask for."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import RuntimeDep, SettingsDep
from server.api.schemas import MethodList, ModelList
from server.service.discovery import methods_info, model_info

router = APIRouter(tags=["discovery"])


# Unset fields stay out of the answer: before the model is loaded it has only id, pretrained, demo and ready.
@router.get("/v1/models", response_model=ModelList, response_model_exclude_unset=True)
def list_models(runtime: RuntimeDep) -> ModelList:
    """The loaded model (one per process), with its device, precision and shape."""
    info = model_info(runtime.spec, runtime.engine, runtime.label_sets, runtime.calibration)
    return ModelList.model_validate({"models": [info]})


@router.get("/v1/methods", response_model=MethodList)
def list_methods(settings: SettingsDep) -> MethodList:
    """Every test-time method with its options schema and the server limits that bound a request."""
    return MethodList.model_validate(methods_info(settings))
