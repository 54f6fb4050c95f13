"""``/v1/sessions/{session_id}``: what a session holds, and forgetting it.

A session exists once a classify request names it (``session``) and belongs to the caller's key name;
another key's session of the same id is another session. Any key may read and reset its own sessions.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.api.auth import CallerDep
from server.api.deps import RuntimeDep
from server.api.openapi import errors
from server.api.schemas import SessionOut

router = APIRouter(tags=["sessions"])


@router.get("/v1/sessions/{session_id}", response_model=SessionOut, responses=errors(404, 422))
def get_session(session_id: str, runtime: RuntimeDep, caller: CallerDep) -> SessionOut:
    """The session's state per label set (entries per class, bytes against the cap, requests, drift signal) and
    when it expires if unused."""
    return SessionOut.model_validate(runtime.sessions.describe(caller.name, session_id))


@router.delete("/v1/sessions/{session_id}", status_code=204, responses=errors(404, 422))
def delete_session(session_id: str, runtime: RuntimeDep, caller: CallerDep) -> Response:
    """Forget the session now: its next request starts from zero-shot."""
    runtime.sessions.delete(caller.name, session_id)
    return Response(status_code=204)
