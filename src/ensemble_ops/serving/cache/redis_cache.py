"""The Redis backend: one cache shared by every replica, never a reason for a request to fail.

Each operation is bounded by ``cache.timeout_s`` (50 ms by default) and retried never
(``GuardedRedis``): on a timeout or an error the request goes on as a miss and the error is
counted; after a failure Redis is skipped for a second, and it comes back by itself.

Single flight across replicas: the first replica to miss a key takes a short lock
(``SET NX PX``) and generates; the others poll for its answer for at most ``lock_wait_s`` and
generate themselves if it does not come (the holder died, or is slow).
"""

from __future__ import annotations

import secrets
import time

import anyio

from ensemble_ops.config import CacheSettings
from ensemble_ops.events import CacheBackendChanged, CacheBackendFailed, EventBus
from ensemble_ops.serving.cache.backend import (
    BackendName,
    CacheHealth,
    decode_completion,
    encode_completion,
)
from ensemble_ops.serving.engine import Completion
from ensemble_ops.serving.guarded_redis import GuardedRedis

__all__ = ["RedisCache"]

POLL_INTERVAL_S = 0.025
"""How often a replica waiting for another's answer looks for it."""

_DOWN = object()
"""What an operation gives when Redis could not be asked."""

# Delete the lock only while it is still ours: it may have expired and been taken since.
_RELEASE = """
if redis.call("get", KEYS[1]) == ARGV[1] then return redis.call("del", KEYS[1]) end
return 0
"""


class RedisCache:
    """Answers in Redis under ``{namespace}:answer:{key}``, locks under ``…:lock:{key}``."""

    backend: BackendName = "redis"

    def __init__(self, settings: CacheSettings, bus: EventBus) -> None:
        assert settings.url is not None  # CacheSettings requires it for this backend
        self._redis = GuardedRedis(
            settings.url.get_secret_value(),
            settings.timeout_s,
            on_failed=lambda op, why: bus.publish(CacheBackendFailed(self.backend, op, why)),
            on_changed=lambda up, why: bus.publish(CacheBackendChanged(self.backend, up, why)),
        )
        self._client = self._redis.client
        self._call = self._redis.call
        self._release_script = self._client.register_script(_RELEASE)
        self._settings = settings
        self._prefix = settings.namespace
        self._claims: dict[str, str] = {}  # key -> our lock token

    # -- the cache ----------------------------------------------------------------------------

    async def get(self, key: str) -> Completion | None:
        data = await self._call("get", lambda: self._client.get(self._answer(key)), None)
        return decode_completion(data) if data is not None else None

    async def put(self, key: str, value: Completion) -> None:
        data = encode_completion(value)
        if len(data) > self._settings.max_value_bytes:
            return
        ttl_ms = int(self._settings.ttl_s * 1000)
        await self._call("put", lambda: self._client.set(self._answer(key), data, px=ttl_ms), None)

    async def claim(self, key: str) -> bool:
        token = secrets.token_hex(8)
        ttl_ms = int(self._settings.lock_ttl_s * 1000)
        taken = await self._call(
            "claim", lambda: self._client.set(self._lock(key), token, nx=True, px=ttl_ms), _DOWN
        )
        if taken is _DOWN:
            return True  # no Redis, no lock: generate
        if taken:
            self._claims[key] = token
            return True
        return False  # another replica holds it

    async def wait_for(self, key: str) -> Completion | None:
        deadline = time.monotonic() + self._settings.lock_wait_s
        while time.monotonic() < deadline:
            pipe = self._client.pipeline(transaction=False)
            pipe.get(self._answer(key))
            pipe.exists(self._lock(key))
            found = await self._call("wait", pipe.execute, None)
            if found is None:
                return None  # Redis failed: generate
            data, locked = found
            if data is not None:
                return decode_completion(data)
            if not locked:  # the holder gave up (failed) without an answer
                return None
            await anyio.sleep(POLL_INTERVAL_S)
        return None

    async def release(self, key: str) -> None:
        token = self._claims.pop(key, None)
        if token is not None:
            await self._call(
                "release",
                lambda: self._release_script(keys=[self._lock(key)], args=[token]),
                None,
            )

    async def health(self) -> CacheHealth:
        if not self._redis.up:
            await self._redis.ping()
        return CacheHealth(self.backend, up=bool(self._redis.up), reason=self._redis.reason)

    async def aclose(self) -> None:
        await self._redis.aclose()

    # -- bounded calls ------------------------------------------------------------------------

    def _answer(self, key: str) -> str:
        return f"{self._prefix}:answer:{key}"

    def _lock(self, key: str) -> str:
        return f"{self._prefix}:lock:{key}"
