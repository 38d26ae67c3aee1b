"""The Redis backend: one cache shared by every replica, never a reason for a request to fail.

Each operation is bounded by ``cache.timeout_s`` (50 ms by default) and retried never: on a
timeout or an error the request goes on as a miss and the error is counted. After a failure
the backend is skipped for a second, then one operation tries again, so a Redis outage costs
at most one timeout per second, not one per request; it comes back by itself.

Single flight across replicas: the first replica to miss a key takes a short lock
(``SET NX PX``) and generates; the others poll for its answer for at most ``lock_wait_s`` and
generate themselves if it does not come (the holder died, or is slow).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ensemble_ops.config import CacheSettings
from ensemble_ops.events import CacheBackendChanged, CacheBackendFailed, EventBus
from ensemble_ops.serving.cache.backend import (
    BackendName,
    CacheHealth,
    decode_completion,
    encode_completion,
)
from ensemble_ops.serving.engine import Completion

__all__ = ["RedisCache"]

T = TypeVar("T")
RETRY_INTERVAL_S = 1.0
"""While Redis is down, one operation per this interval tries it again."""
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
        timeout = settings.timeout_s
        self._client: Redis = Redis.from_url(
            settings.url.get_secret_value(),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # a retry would double the bound on a request
            health_check_interval=0,
        )
        self._release_script = self._client.register_script(_RELEASE)
        self._settings = settings
        self._bus = bus
        self._prefix = settings.namespace
        self._claims: dict[str, str] = {}  # key -> our lock token
        self._up: bool | None = None  # unknown until the first operation
        self._reason: str | None = "not contacted yet"
        self._next_try = 0.0

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
        if not self._up:
            await self._call("ping", self._client.ping, None)
        return CacheHealth(self.backend, up=bool(self._up), reason=self._reason)

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- bounded calls ------------------------------------------------------------------------

    def _answer(self, key: str) -> str:
        return f"{self._prefix}:answer:{key}"

    def _lock(self, key: str) -> str:
        return f"{self._prefix}:lock:{key}"

    async def _call(self, operation: str, call: Callable[[], Awaitable[Any]], default: T) -> Any:
        """``call()`` bounded by the timeout; ``default`` when it fails or Redis is being
        skipped after a failure."""
        now = time.monotonic()
        if self._up is False:
            if now < self._next_try:
                return default
            self._next_try = now + RETRY_INTERVAL_S  # this call is the one that tries
        try:
            with anyio.fail_after(self._settings.timeout_s):
                result = await call()
        except (RedisError, OSError, TimeoutError) as err:
            self._failed(operation, err)
            return default
        if self._up is not True:
            self._up, self._reason = True, None
            self._bus.publish(CacheBackendChanged(self.backend, up=True))
        return result

    def _failed(self, operation: str, err: Exception) -> None:
        reason = f"{operation}: {_describe(err)}"
        self._bus.publish(CacheBackendFailed(self.backend, operation, _describe(err)))
        self._next_try = time.monotonic() + RETRY_INTERVAL_S
        if self._up is not False:
            self._up, self._reason = False, reason
            self._bus.publish(CacheBackendChanged(self.backend, up=False, reason=reason))


def _describe(err: Exception) -> str:
    """One line naming the fault (redis' messages name host and port, never the password)."""
    if isinstance(err, TimeoutError) and not str(err):
        return "timed out"
    return f"{type(err).__name__}: {err}"
