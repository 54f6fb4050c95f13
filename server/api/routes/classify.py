"""``POST /v1/classify``: read the body, call the classify service, shape the answer."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.deps import Accepting, ClassifierDep, SettingsDep
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
async def classify(request: Request, classifier: ClassifierDep, settings: SettingsDep) -> ClassifyResponse:
    """Classify one or more images against labels (or a label set).

    Send JSON with base64 images, or multipart/form-data with repeated ``image`` file fields.
    """
    req = await read_classify(request, settings)
    answer = await classifier.classify(req, disconnected=request.is_disconnected)
    return ClassifyResponse(
        request_id=request.state.request_id,
        model=answer.model,
        method=answer.method,
        results=answer.results,
        timings=answer.timings,
    )
