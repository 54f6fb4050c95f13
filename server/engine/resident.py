"""The adapters loaded in this process: on the model's device, least recently used unloaded past a byte cap.

Keyed by the artifact's sha256, so the same bytes are loaded once whichever owner or version names them
(an owner reaches an adapter only through its own records: the key is content, not a name). A loaded
adapter also keeps the class features it gave per label set (``class_features``), so a label set's text
side is computed once per adapter; they count against the cap with it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapters.fewshot.artifact import Adapter


@dataclass(eq=False)
class Resident:
    """One loaded adapter and what it computed for label sets, on the device."""

    sha256: str
    adapter: Adapter
    class_features: dict[object, torch.Tensor] = field(default_factory=dict)  # by ClassText key

    @property
    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in self.class_features.values())
        return self.adapter.nbytes + extra


class ResidentAdapters:
    """A thread-safe LRU of loaded adapters within ``cap_bytes`` (0: nothing kept between requests)."""

    MAX_LABEL_SETS = 16  # class features kept per adapter (least recently added dropped)

    def __init__(self, cap_bytes: int, device: Callable[[], torch.device], on_load: Callable[[], None] = lambda: None):
        self.cap_bytes = cap_bytes
        self._device = device
        self._on_load = on_load
        self._loaded: OrderedDict[str, Resident] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # adapters read from the store and loaded, since start

    def get(self, sha256: str, load: Callable[[], Adapter]) -> Resident:
        """The loaded adapter with these bytes, loading it with ``load`` (a store read and a parse) on a miss."""
        with self._lock:
            found = self._loaded.get(sha256)
            if found is not None:
                self._loaded.move_to_end(sha256)
                return found
        adapter = load()
        device = self._device()
        moved = Adapter(adapter.card, {k: v.to(device) for k, v in adapter.tensors.items()})
        resident = Resident(sha256, moved)
        self._on_load()
        with self._lock:
            self.loads += 1
            self._loaded[sha256] = resident
            self._loaded.move_to_end(sha256)
            self._evict()
        return resident

    def remember(self, resident: Resident, key: object, features: torch.Tensor) -> None:
        """Keep ``features`` as ``resident``'s class features for the label set ``key``."""
        with self._lock:
            resident.class_features[key] = features
            while len(resident.class_features) > self.MAX_LABEL_SETS:
                resident.class_features.pop(next(iter(resident.class_features)))
            self._evict()

    def _evict(self) -> None:
        """Unload the least recently used past the cap; the newest stays even alone over it (it is in use)."""
        while len(self._loaded) > 1 and self.bytes > self.cap_bytes:
            self._loaded.popitem(last=False)
        if self.cap_bytes == 0:
            self._loaded.clear()

    @property
    def bytes(self) -> int:
        return sum(r.nbytes for r in list(self._loaded.values()))

    def resident(self) -> dict[str, int]:
        """The loaded adapters' sha256 and bytes, least recently used first."""
        with self._lock:
            return {sha: r.nbytes for sha, r in self._loaded.items()}
