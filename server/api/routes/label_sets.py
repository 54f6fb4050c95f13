"""``/v1/label-sets``: create, list, read and delete named label sets."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from server.api.auth import CallerDep
from server.api.deps import Accepting, LabelSetsDep, RecalibrationDep, SettingsDep
from server.api.inputs import read_calibration
from server.api.openapi import CALIBRATION_OPENAPI, ERRORS, errors
from server.api.schemas import CalibrationOut, ErrorBody, LabelSetIn, LabelSetList, LabelSetOut

router = APIRouter(tags=["label sets"])


@router.post(
    "/v1/label-sets",
    status_code=201,
    response_model=LabelSetOut,
    responses=errors(400, 413, 422) | {409: {"model": ErrorBody, "description": "Name taken."}},
)
def create_label_set(body: LabelSetIn, label_sets: LabelSetsDep, caller: CallerDep) -> LabelSetOut:
    """Register a label set; it is stored durably and survives restarts, and seen by its key's name only."""
    return LabelSetOut.of(
        label_sets.create(body.name, body.labels, body.templates, body.descriptions, owner=caller.name)
    )


@router.get("/v1/label-sets", response_model=LabelSetList)
def list_label_sets(label_sets: LabelSetsDep, caller: CallerDep) -> LabelSetList:
    """Every label set the caller sees: its own stored ones and those that ship with the model."""
    return LabelSetList(label_sets=[LabelSetOut.of(s) for s in label_sets.list(owner=caller.name)])


@router.get("/v1/label-sets/{name}", response_model=LabelSetOut, responses=errors(404))
def get_label_set(name: str, label_sets: LabelSetsDep, caller: CallerDep) -> LabelSetOut:
    """One label set, the caller's own or shipped with the model."""
    return LabelSetOut.of(label_sets.get(name, owner=caller.name))


@router.delete(
    "/v1/label-sets/{name}",
    status_code=204,
    responses={404: ERRORS[404], 409: {"model": ErrorBody, "description": "Built into the model."}},
)
def delete_label_set(name: str, label_sets: LabelSetsDep, caller: CallerDep) -> Response:
    """Delete a stored label set and the calibrations fitted for it; those of the model cannot be deleted."""
    label_sets.delete(name, owner=caller.name)
    return Response(status_code=204)


_RUNNING: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "A calibration of this label set is running."}
}


@router.post(
    "/v1/label-sets/{name}/calibration",
    status_code=202,
    response_model=CalibrationOut,
    responses=errors(400, 404, 413, 415, 422, 503) | _RUNNING,
    dependencies=[Accepting],
    openapi_extra=CALIBRATION_OPENAPI,
)
async def calibrate_label_set(
    name: str,
    request: Request,
    response: Response,
    recalibration: RecalibrationDep,
    settings: SettingsDep,
    caller: CallerDep,
) -> CalibrationOut:
    """Fit calibration on labelled images of this label set, in the background; GET shows progress and results.

    Later requests on the label set use it (per method, else its zero_shot fit). It is stored with the
    label set and survives restarts; deleting or re-creating the label set, or another model, drops it.
    """
    images, labels, methods = await read_calibration(request, settings)
    status = recalibration.start(name, images, labels, methods, owner=caller.name)
    response.headers["Location"] = f"/v1/label-sets/{name}/calibration"
    return CalibrationOut.model_validate(status)


@router.get("/v1/label-sets/{name}/calibration", response_model=CalibrationOut, responses=errors(404))
def get_calibration(name: str, recalibration: RecalibrationDep, caller: CallerDep) -> CalibrationOut:
    """The fit in progress (or the last one), and what is fitted for this label set, with held-out ECE."""
    return CalibrationOut.model_validate(recalibration.describe(name, owner=caller.name))


@router.delete("/v1/label-sets/{name}/calibration", status_code=204, responses=errors(404) | _RUNNING)
def delete_calibration(name: str, recalibration: RecalibrationDep, caller: CallerDep) -> Response:
    """Drop what was fitted: the label set's answers go back to the label-free default."""
    recalibration.drop(name, owner=caller.name)
    return Response(status_code=204)
