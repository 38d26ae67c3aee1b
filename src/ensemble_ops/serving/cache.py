"""Response cache for deterministic requests.

Only requests whose output is fixed (temperature 0, or a seed given) are cached. The key holds
the member, the generation id of its loaded instance (so a reload never serves an answer of
the old copy) and every parameter that shapes the output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

from cachetools import TTLCache

from ensemble_ops.serving.engine import Completion, GenerationParams

__all__ = ["ResponseCache", "is_deterministic"]


def is_deterministic(params: GenerationParams) -> bool:
    """Whether the same request always produces the same text."""
    return params.temperature == 0 or params.seed is not None


class ResponseCache:
    """LRU bounded in entries, each entry living at most ``ttl_s`` (cachetools' TTLCache).

    Used from the event loop only, so it needs no lock.
    """

    def __init__(
        self, max_entries: int, ttl_s: float, timer: Callable[[], float] = time.monotonic
    ) -> None:
        self._entries: TTLCache[Hashable, Completion] = TTLCache(max_entries, ttl_s, timer)

    @staticmethod
    def key(member: str, generation: int, prompt: Hashable, params: GenerationParams) -> Hashable:
        return (member, generation, prompt, params)

    def get(self, key: Hashable) -> Completion | None:
        return self._entries.get(key)

    def put(self, key: Hashable, value: Completion) -> None:
        self._entries[key] = value

    def __len__(self) -> int:
        return len(self._entries)
