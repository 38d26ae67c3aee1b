"""A Redis connection that can never be the reason a request fails.

Each call is bounded by a timeout and retried never: on a timeout or an error the caller
gets its default and the failure is reported. After a failure Redis is skipped for a
second, then one call tries again, so an outage costs at most one timeout per second, not
one per request; it comes back by itself. The response cache and the shared rate limits
use it alike.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = ["RETRY_INTERVAL_S", "GuardedRedis", "describe"]

T = TypeVar("T")
RETRY_INTERVAL_S = 1.0
"""While Redis is down, one call per this interval tries it again."""

OnFailed = Callable[[str, str], None]
"""(operation, what went wrong): one call failed or timed out."""
OnChanged = Callable[[bool, str | None], None]
"""(up, reason): Redis became reachable again, or stopped being reachable."""


class GuardedRedis:
    """A Redis client at ``url`` whose every call goes through :meth:`call`."""

    def __init__(
        self, url: str, timeout_s: float, *, on_failed: OnFailed, on_changed: OnChanged
    ) -> None:
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # a retry would double the bound on a request
            health_check_interval=0,
        )
        self._timeout_s = timeout_s
        self._on_failed = on_failed
        self._on_changed = on_changed
        self.up: bool | None = None  # unknown until the first call
        self.reason: str | None = "not contacted yet"
        self._next_try = 0.0

    async def call(self, operation: str, call: Callable[[], Awaitable[Any]], default: T) -> Any:
        """``call()`` bounded by the timeout; ``default`` when it fails or Redis is being
        skipped after a failure."""
        now = time.monotonic()
        if self.up is False:
            if now < self._next_try:
                return default
            self._next_try = now + RETRY_INTERVAL_S  # this call is the one that tries
        try:
            with anyio.fail_after(self._timeout_s):
                result = await call()
        except (RedisError, OSError, TimeoutError) as err:
            self._failed(operation, err)
            return default
        if self.up is not True:
            self.up, self.reason = True, None
            self._on_changed(True, None)
        return result

    async def ping(self) -> bool:
        """Ask Redis now (unless it is being skipped): whether it answered."""
        return bool(await self.call("ping", self.client.ping, False))

    async def aclose(self) -> None:
        await self.client.aclose()

    def _failed(self, operation: str, err: Exception) -> None:
        reason = f"{operation}: {describe(err)}"
        self._on_failed(operation, describe(err))
        self._next_try = time.monotonic() + RETRY_INTERVAL_S
        if self.up is not False:
            self.up, self.reason = False, reason
            self._on_changed(False, reason)


def describe(err: Exception) -> str:
    """One line naming the fault (redis' messages name host and port, never the password)."""
    if isinstance(err, TimeoutError) and not str(err):
        return "timed out"
    return f"{type(err).__name__}: {err}"
