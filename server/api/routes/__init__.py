"""The HTTP routes, one module per resource; each handler parses, calls the service layer, shapes the answer."""

from fastapi import APIRouter

from server.api.routes import classify, discovery, label_sets, operations

router = APIRouter()
for module in (classify, label_sets, discovery, operations):
    router.include_router(module.router)

__all__ = ["router"]
