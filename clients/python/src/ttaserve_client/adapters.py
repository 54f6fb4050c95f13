"""The clients' adapter methods: upload, list, read, download, delete and merge stored few-shot adapters.

Mixed into ``Client`` and ``AsyncClient`` (``client.py``), which bring ``send``; what each call sends is in
``calls.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from ttaserve_client.calls import Call, Calls
from ttaserve_client.models import Adapter, AdapterList, Merge

T = TypeVar("T")


class Adapters:
    """``Client``'s adapters."""

    def send(self, call: Call[T]) -> T:
        raise NotImplementedError

    def upload_adapter(self, artifact: str | Path | bytes, name: str, group: str | None = None) -> Adapter:
        """Store an adapter artifact (a ``.safetensors`` path or its bytes) as the next version of ``name``."""
        return self.send(Calls.upload_adapter(artifact, name, group))

    def adapters(self) -> AdapterList:
        """Every version of your adapters, with what the server holds loaded."""
        return self.send(Calls.adapters())

    def adapter(self, ref: str) -> Adapter:
        return self.send(Calls.adapter(ref))

    def download_adapter(self, ref: str) -> bytes:
        return self.send(Calls.download_adapter(ref))

    def delete_adapter(self, ref: str) -> None:
        """Delete one version (``NAME@vN``) or every version of ``NAME``."""
        self.send(Calls.delete_adapter(ref))

    def merge_adapters(
        self,
        group: str,
        method: str = "emr",
        *,
        scale: float | None = None,
        density: float | None = None,
        name: str | None = None,
    ) -> Merge:
        """Merge the newest version of each adapter of ``group`` into one (``emr``, ``ties`` or ``task_arithmetic``)."""
        return self.send(Calls.merge_adapters(group, method, scale, density, name))


class AsyncAdapters:
    """``AsyncClient``'s adapters."""

    async def send(self, call: Call[T]) -> T:
        raise NotImplementedError

    async def upload_adapter(self, artifact: str | Path | bytes, name: str, group: str | None = None) -> Adapter:
        return await self.send(Calls.upload_adapter(artifact, name, group))

    async def adapters(self) -> AdapterList:
        return await self.send(Calls.adapters())

    async def adapter(self, ref: str) -> Adapter:
        return await self.send(Calls.adapter(ref))

    async def download_adapter(self, ref: str) -> bytes:
        return await self.send(Calls.download_adapter(ref))

    async def delete_adapter(self, ref: str) -> None:
        await self.send(Calls.delete_adapter(ref))

    async def merge_adapters(
        self,
        group: str,
        method: str = "emr",
        *,
        scale: float | None = None,
        density: float | None = None,
        name: str | None = None,
    ) -> Merge:
        return await self.send(Calls.merge_adapters(group, method, scale, density, name))
