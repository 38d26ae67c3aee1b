"""The in-memory backend: one process's LRU with a time to live (the default)."""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TTLCache

from ensemble_ops.serving.cache.backend import BackendName, CacheHealth
from ensemble_ops.serving.engine import Completion

__all__ = ["MemoryCache"]


class MemoryCache:
    """LRU bounded in entries, each living at most ``ttl_s`` (cachetools' TTLCache).

    Used from the event loop only, so it needs no lock. Identical requests in this process
    share one generation through the ensemble's single flight, so ``claim`` always wins.
    """

    backend: BackendName = "memory"

    def __init__(
        self, max_entries: int, ttl_s: float, timer: Callable[[], float] = time.monotonic
    ) -> None:
        self._entries: TTLCache[str, Completion] = TTLCache(max_entries, ttl_s, timer)

    async def get(self, key: str) -> Completion | None:
        return self._entries.get(key)

    async def put(self, key: str, value: Completion) -> None:
        self._entries[key] = value

    async def claim(self, key: str) -> bool:
        return True

    async def wait_for(self, key: str) -> Completion | None:
        return None

    async def release(self, key: str) -> None:
        return None

    async def health(self) -> CacheHealth:
        return CacheHealth(self.backend, up=True)

    async def aclose(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
