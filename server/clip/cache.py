"""A thread-safe LRU bounded by the bytes its entries hold, keys included (class text features, prompt inputs).

The text caches share one budget, ``TTA_TEXT_CACHE_BYTES``: three quarters for class features, a quarter
for the prompt inputs of the prompt-tuning methods (``split_text_budget``).
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

V = TypeVar("V")


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def key_bytes(key: object) -> int:
    """What a cache key holds in memory: the labels and templates of a label set can outweigh its features."""
    if isinstance(key, (tuple, list, frozenset)):
        return sys.getsizeof(key) + sum(key_bytes(part) for part in key)
    return sys.getsizeof(key)


def split_text_budget(total: int) -> tuple[int, int]:
    """``TTA_TEXT_CACHE_BYTES`` into the class-feature cache's bytes and the prompt-input cache's."""
    prompts = total // 4
    return total - prompts, prompts


class ByteLRU(Generic[V]):
    """Least recently used entries are evicted once the entries' bytes (key and value) pass ``max_bytes``."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: V) -> None:
        size = self._size_of(value) + key_bytes(key)
        if size > self.max_bytes:
            return  # larger than the whole budget: computed per request, never kept
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self.bytes -= evicted

    def __len__(self) -> int:
        return len(self._items)
