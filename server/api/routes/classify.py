"""``POST /v1/classify``: read the body, call the classify service, shape the answer."""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Request

from server.api.auth import CallerDep
from server.api.deps import Accepting, ClassifierDep, RateLimitsDep, SettingsDep
from server.api.inputs import read_classify
from server.api.openapi import CLASSIFY_OPENAPI, ERRORS
from server.api.schemas import ClassifyResponse

router = APIRouter(tags=["classify"])


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    openapi_extra=CLASSIFY_OPENAPI,
    summary="Classify images zero-shot or with test-time adaptation",
    dependencies=[Accepting],
)
async def classify(
    request: Request, classifier: ClassifierDep, settings: SettingsDep, caller: CallerDep, limits: RateLimitsDep
) -> ClassifyResponse:
    """Classify one or more images against labels (or a label set).

    Send JSON with base64 images, or multipart/form-data with repeated ``image`` file fields.
    """
    req = replace(await read_classify(request, settings), owner=caller.name)
    # One bucket per key name; without keys, per client address.
    who = caller.name or (request.client.host if request.client else "unknown")
    describe = f"key {caller.name!r}" if caller.name else f"client {who}"

    def admit(images: float, adaptive: bool) -> None:
        limits.charge(who, images, "adaptation" if adaptive else "zero_shot", describe)

    answer = await classifier.classify(req, disconnected=request.is_disconnected, admit=admit)
    return ClassifyResponse(
        request_id=request.state.request_id,
        model=answer.model,
        method=answer.method,
        results=answer.results,
        timings=answer.timings,
    )
