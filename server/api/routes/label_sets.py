"""``/v1/label-sets``: create, list, read and delete named label sets."""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.api.deps import LabelSetsDep
from server.api.openapi import ERRORS, errors
from server.api.schemas import ErrorBody, LabelSetIn, LabelSetList, LabelSetOut

router = APIRouter(tags=["label sets"])


@router.post(
    "/v1/label-sets",
    status_code=201,
    response_model=LabelSetOut,
    responses=errors(400, 422) | {409: {"model": ErrorBody, "description": "Name taken."}},
)
def create_label_set(body: LabelSetIn, label_sets: LabelSetsDep) -> LabelSetOut:
    """Register a label set; it is stored durably and survives restarts."""
    return LabelSetOut.of(label_sets.create(body.name, body.labels, body.templates, body.descriptions))


@router.get("/v1/label-sets", response_model=LabelSetList)
def list_label_sets(label_sets: LabelSetsDep) -> LabelSetList:
    return LabelSetList(label_sets=[LabelSetOut.of(s) for s in label_sets.list()])


@router.get("/v1/label-sets/{name}", response_model=LabelSetOut, responses=errors(404))
def get_label_set(name: str, label_sets: LabelSetsDep) -> LabelSetOut:
    return LabelSetOut.of(label_sets.get(name))


@router.delete(
    "/v1/label-sets/{name}",
    status_code=204,
    responses={404: ERRORS[404], 409: {"model": ErrorBody, "description": "Built into the model."}},
)
def delete_label_set(name: str, label_sets: LabelSetsDep) -> Response:
    label_sets.delete(name)
    return Response(status_code=204)
