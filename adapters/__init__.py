"""Test-time methods, one file each, behind ``adapters.base.Method``; the model behind ``adapters.Backbone``.

Importing this package registers every method; ``get_method`` and ``method_names`` are the stable
way to reach them. Nothing here imports the server: the server imports this package.
"""

from typing import Any

from adapters import ctpt, mta, tps, tpt, ttl, zero, zero_shot  # noqa: F401  (each registers on import)
from adapters.backbone import Backbone, UnsupportedModel
from adapters.base import (
    REGISTRY,
    AdaptInput,
    AdaptResult,
    Cost,
    Method,
    MethodOptions,
    OptionsError,
    Stopped,
    register,
)


def get_method(name: str) -> Method[Any]:
    return REGISTRY[name]


def method_names() -> list[str]:
    return sorted(REGISTRY)


__all__ = [
    "AdaptInput",
    "AdaptResult",
    "Backbone",
    "Cost",
    "Method",
    "MethodOptions",
    "OptionsError",
    "Stopped",
    "UnsupportedModel",
    "get_method",
    "method_names",
    "register",
]
