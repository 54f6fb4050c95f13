"""``/v1/adapters``: upload, list, read, download and delete few-shot adapters, each version kept for its key;
``/v1/adapter-groups/{group}/merge``: merge a group's adapters into one.

An upload's body is the artifact itself (``application/octet-stream``: the safetensors file a training
job, ``python -m server train`` or ``GET .../artifact`` gives); ``name`` and ``group`` are query
parameters. Versions count up per name; a request uses ``name`` (the newest) or ``name@vN``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from server.api.auth import CallerDep
from server.api.deps import RuntimeDep
from server.api.openapi import ERRORS, errors
from server.api.schemas import AdapterList, AdapterOut, ErrorBody, MergedMember, MergeIn, MergeOut
from server.errors import UnsupportedMediaType
from server.storage.base import AdapterRecord

router = APIRouter(tags=["adapters"])
ARTIFACT_TYPE = "application/octet-stream"


def adapter_out(record: AdapterRecord, resident: dict[str, int]) -> AdapterOut:
    card = record.card
    return AdapterOut(
        name=record.name,
        version=record.version,
        ref=record.ref,
        type=str(card.get("type")),
        parts=list(card.get("parts", [])),
        base_model=str(card.get("base_model")),
        labels=list(card.get("labels", [])),
        group=record.group,
        source=record.source,
        sha256=record.sha256,
        bytes=record.nbytes,
        resident=record.sha256 in resident,
        training=card.get("training") or {},
        metrics=card.get("metrics") or {},
        created_at=record.created_at,
    )


@router.post(
    "/v1/adapters",
    status_code=201,
    response_model=AdapterOut,
    responses=errors(413, 415, 422, 503)
    | {409: {"model": ErrorBody, "description": "Made for another base model (both fingerprints named)."}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {ARTIFACT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_adapter(
    request: Request,
    runtime: RuntimeDep,
    caller: CallerDep,
    name: Annotated[str, Query(description="The adapter's name; each upload is its next version.")],
    group: Annotated[str | None, Query(description="An adapter group to merge it with others later.")] = None,
) -> AdapterOut:
    """Keep an adapter artifact as the next version of ``name``; it must be made for the served model."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != ARTIFACT_TYPE:
        raise UnsupportedMediaType(
            f"send the artifact file itself as {ARTIFACT_TYPE} (curl --data-binary @adapter.safetensors), not {media!r}"
        )
    data = await request.body()
    record = runtime.adapters.add(data, name, owner=caller.name, group=group)
    return adapter_out(record, runtime.adapters.resident())


@router.get("/v1/adapters", response_model=AdapterList)
def list_adapters(runtime: RuntimeDep, caller: CallerDep) -> AdapterList:
    """Every version of the caller's adapters, and which are loaded now."""
    resident = runtime.adapters.resident()
    return AdapterList(
        adapters=[adapter_out(r, resident) for r in runtime.adapters.list(caller.name)],
        resident_bytes=sum(resident.values()),
        cache_bytes=runtime.settings.adapter_cache_bytes,
    )


@router.get("/v1/adapters/{ref}", response_model=AdapterOut, responses=errors(404, 422))
def get_adapter(ref: str, runtime: RuntimeDep, caller: CallerDep) -> AdapterOut:
    """One version (``name@vN``), or the newest of ``name``: its card, source and residency."""
    return adapter_out(runtime.adapters.get(ref, caller.name), runtime.adapters.resident())


@router.get(
    "/v1/adapters/{ref}/artifact",
    response_class=Response,
    responses=errors(404, 422) | {200: {"content": {ARTIFACT_TYPE: {}}, "description": "The artifact file."}},
)
def download_adapter(ref: str, runtime: RuntimeDep, caller: CallerDep) -> Response:
    """The artifact file, as uploaded or made: upload it to another server running the same model."""
    record, data = runtime.adapters.artifact(ref, caller.name)
    disposition = f'attachment; filename="{record.name}-v{record.version}.safetensors"'
    return Response(data, media_type=ARTIFACT_TYPE, headers={"Content-Disposition": disposition})


@router.delete("/v1/adapters/{ref}", status_code=204, responses={404: ERRORS[404], 422: ERRORS[422]})
def delete_adapter(ref: str, runtime: RuntimeDep, caller: CallerDep) -> Response:
    """Delete one version (``name@vN``) or every version of ``name``."""
    runtime.adapters.delete(ref, caller.name)
    return Response(status_code=204)


@router.post(
    "/v1/adapter-groups/{group}/merge", status_code=201, response_model=MergeOut, responses=errors(400, 404, 413, 422)
)
async def merge_adapter_group(group: str, body: MergeIn, runtime: RuntimeDep, caller: CallerDep) -> MergeOut:
    """Merge the newest version of each adapter in ``group`` into one adapter, from the originals (never from an
    earlier merge): ``emr`` also stores each member's reconstruction. Every result is a new adapter version."""
    outcome = await run_in_threadpool(
        runtime.adapters.merge_group,
        group,
        body.method,
        owner=caller.name,
        name=body.name,
        scale=body.scale,
        density=body.density,
    )
    return MergeOut(
        method=outcome.method,
        unified=adapter_out(outcome.unified, runtime.adapters.resident()),
        members=[MergedMember(**vars(m)) for m in outcome.members],
    )
