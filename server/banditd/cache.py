"""A bounded in-memory cache in front of data that also lives in LMDB."""

from __future__ import annotations

from itertools import islice
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """Keeps at most `capacity` entries; beyond it the oldest-inserted tenth is dropped at once
    (dicts keep insertion order). Misses fall back to the store, so eviction costs a read,
    never correctness. Safe to share between threads: each step is one atomic dict operation."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._data: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._data.get(key)

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        if len(self._data) > self.capacity:
            for old in list(islice(iter(self._data), max(1, self.capacity // 10))):
                self._data.pop(old, None)

    def __len__(self) -> int:
        return len(self._data)
