"""The HTTP routes, one module per resource; each handler parses, calls the service layer, shapes the answer.

Every route of the API asks ``authorize`` first (``server.api.auth``): one place decides who may call what.
Only liveness, readiness and metrics (and the web page, outside this router) are left open.
"""

from fastapi import APIRouter, Depends

from server.api.auth import authorize
from server.api.openapi import errors
from server.api.routes import adapters, classify, discovery, jobs, label_sets, operations, sessions

router = APIRouter()
for module in (classify, label_sets, sessions, adapters, jobs, discovery):
    router.include_router(module.router, dependencies=[Depends(authorize)], responses=errors(401, 403))
router.include_router(operations.router)

__all__ = ["router"]
