"""``/v1/jobs``: submit a few-shot fine-tune, follow it, list and cancel your jobs.

``POST /v1/jobs/finetune`` answers 202 with the queued job and ``Location: /v1/jobs/{id}``; the job trains in
a worker process and publishes its adapter to ``/v1/adapters``. ``DELETE /v1/jobs/{id}`` cancels it.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.api.auth import CallerDep
from server.api.deps import RuntimeDep
from server.api.job_schemas import FinetuneIn, JobList, JobOut
from server.api.openapi import errors
from server.api.schemas import ErrorBody
from server.service.jobs import FinetuneRequest

router = APIRouter(tags=["jobs"])


LOCATION = {
    "Location": {"description": "Where to follow the job (GET) or cancel it (DELETE).", "schema": {"type": "string"}}
}


@router.post(
    "/v1/jobs/finetune",
    status_code=202,
    response_model=JobOut,
    responses=errors(400, 404, 413, 422) | {202: {"description": "Queued.", "headers": LOCATION}},
)
def submit_finetune(body: FinetuneIn, response: Response, runtime: RuntimeDep, caller: CallerDep) -> JobOut:
    """Queue the training of a few-shot adapter; everything is checked now (422), the training runs after."""
    anchors = body.anchors
    request = FinetuneRequest(
        label_set=body.label_set,
        support=[(s.image, s.label) for s in body.support],
        name=body.name,
        group=body.group,
        config=body.config(),
        captions=[(a.image, a.text) for a in anchors.captions] if anchors else [],
        pool=[(a.image, a.text) for a in anchors.pool] if anchors else [],
    )
    job = runtime.jobs.finetune(request, caller.name)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.of(job)


@router.get("/v1/jobs", response_model=JobList)
def list_jobs(runtime: RuntimeDep, caller: CallerDep) -> JobList:
    """Your jobs, oldest first."""
    return JobList(jobs=[JobOut.of(j) for j in runtime.jobs.list(caller.name)])


@router.get("/v1/jobs/{job_id}", response_model=JobOut, responses=errors(404))
def get_job(job_id: str, runtime: RuntimeDep, caller: CallerDep) -> JobOut:
    """One of your jobs: its state and progress (step, loss, elapsed_s, eta_s), result or error."""
    return JobOut.of(runtime.jobs.get(job_id, caller.name))


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobOut,
    responses=errors(404) | {409: {"model": ErrorBody, "description": "The job has ended (job_finished)."}},
)
def cancel_job(job_id: str, runtime: RuntimeDep, caller: CallerDep) -> JobOut:
    """Cancel a queued or running job (its worker is stopped; nothing is published): the job, now cancelled.
    409 ``job_finished`` once it has ended."""
    return JobOut.of(runtime.jobs.cancel(job_id, caller.name))
