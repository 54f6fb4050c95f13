"""Test-time methods, one file each, behind ``adapters.base.Method``.

Importing this package registers every method; ``get_method`` and ``method_names`` are the
stable way to reach them.
"""

from adapters import ctpt, mta, tps, tpt, ttl, zero, zero_shot  # noqa: F401  (each registers on import)
from adapters.base import REGISTRY, AdaptInput, AdaptResult, Method, OptionsError, register


def get_method(name: str) -> Method:
    return REGISTRY[name]


def method_names() -> list[str]:
    return sorted(REGISTRY)


__all__ = ["AdaptInput", "AdaptResult", "Method", "OptionsError", "get_method", "method_names", "register"]
