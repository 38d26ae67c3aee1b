"""What the ensemble asks of a cache backend, and the one place that picks it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias

from ensemble_ops.config import CacheSettings
from ensemble_ops.events import EventBus
from ensemble_ops.serving.engine import Completion

__all__ = [
    "BackendName",
    "CacheHealth",
    "ResponseCache",
    "decode_completion",
    "encode_completion",
    "open_cache",
]

BackendName: TypeAlias = Literal["memory", "redis"]


@dataclass(frozen=True)
class CacheHealth:
    """Whether the backend answers; a degraded cache slows nothing and fails nothing."""

    backend: BackendName
    up: bool
    reason: str | None = None


class ResponseCache(Protocol):
    """Answers by key (see ``keys.cache_key``). Every method is bounded in time and never
    raises for a backend fault: a lookup that cannot be made is a miss."""

    @property
    def backend(self) -> BackendName: ...

    async def get(self, key: str) -> Completion | None: ...

    async def put(self, key: str, value: Completion) -> None: ...

    async def claim(self, key: str) -> bool:
        """True: this process generates the answer (and must ``release`` it); False: another
        replica already is, so ``wait_for`` its answer."""
        ...

    async def wait_for(self, key: str) -> Completion | None:
        """Another replica's answer, waited for with a bound; None: generate it yourself."""
        ...

    async def release(self, key: str) -> None: ...

    async def health(self) -> CacheHealth:
        """The backend's state; asks the backend again when it was down."""
        ...

    async def aclose(self) -> None: ...


def encode_completion(value: Completion) -> bytes:
    return json.dumps(dataclasses.asdict(value), separators=(",", ":")).encode()


def decode_completion(data: bytes) -> Completion | None:
    """The stored answer, or None for anything else (another release's layout)."""
    try:
        fields = json.loads(data)
        return Completion(**fields)
    except (ValueError, TypeError):
        return None


def open_cache(settings: CacheSettings, bus: EventBus) -> ResponseCache | None:
    """The configured backend, or None when the cache is off. Connects lazily: a Redis that
    is down at start-up makes a degraded cache, not a failed start."""
    if not settings.enabled:
        return None
    if settings.backend == "redis":
        from ensemble_ops.serving.cache.redis_cache import RedisCache  # imports redis

        return RedisCache(settings, bus)
    from ensemble_ops.serving.cache.memory import MemoryCache

    return MemoryCache(settings.max_entries, settings.ttl_s)
