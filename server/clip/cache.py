"""A thread-safe LRU bounded by the bytes its values hold (class text features, prompt inputs)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

V = TypeVar("V")


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ByteLRU(Generic[V]):
    """Least recently used entries are evicted once the values' bytes pass ``max_bytes``."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._size_of = size_of
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> None:
        size = self._size_of(value)
        if size > self.max_bytes:
            return  # larger than the whole budget: computed per request, never kept
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= self._size_of(old)
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= self._size_of(evicted)

    def __len__(self) -> int:
        return len(self._items)
