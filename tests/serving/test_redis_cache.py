"""The Redis backend against a real redis-server: sharing, the lock, and a Redis that is
slow, absent or back again never failing a request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ensemble_ops.config import CacheSettings
from ensemble_ops.events import CacheBackendChanged, CacheBackendFailed, EventBus
from ensemble_ops.serving.cache.redis_cache import RedisCache
from ensemble_ops.serving.engine import Completion

from ..conftest import Recorded
from ..redis_server import RedisServer, redis_server

ANSWER = Completion("Paris.", "stop", 9, 3)


class _Events(Recorded):
    def __init__(self, bus: EventBus) -> None:
        super().__init__(bus, CacheBackendFailed, CacheBackendChanged)

    def changes(self) -> list[bool]:
        return [e.up for e in self.of(CacheBackendChanged)]

    def failures(self) -> list[CacheBackendFailed]:
        return self.of(CacheBackendFailed)


@pytest.fixture(name="server")
def _server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture(name="raw")
def _raw(server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client, to look at what the cache wrote."""
    with redis.Redis.from_url(server.url) as client:
        yield client


def _settings(url: str, **changes: Any) -> CacheSettings:
    # A generous timeout: on a busy test machine 50 ms can pass without any fault, and
    # these tests are about what Redis holds (the timeout has a test of its own).
    return CacheSettings.model_validate(
        {"backend": "redis", "url": url, "timeout_s": 1.0, **changes}
    )


@pytest.fixture(name="bus")
def _bus() -> EventBus:
    return EventBus()


@pytest.fixture(name="make_cache")
async def _make_cache(bus: EventBus) -> AsyncIterator[Any]:
    """RedisCache factory: each one is a replica of its own; all are closed at the end."""
    made: list[RedisCache] = []

    def make(url: str, **changes: Any) -> RedisCache:
        cache = RedisCache(_settings(url, **changes), bus)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.aclose()


class TestSharing:
    async def test_an_answer_stored_by_one_replica_is_read_by_another(
        self, server: RedisServer, make_cache: Any
    ) -> None:
        """Two clients (two replicas) share entries; an unknown key is a miss."""
        a, b = make_cache(server.url), make_cache(server.url)
        await a.put("k", ANSWER)
        assert await b.get("k") == ANSWER
        assert await b.get("other") is None

    async def test_keys_live_under_the_namespace_with_the_ttl(
        self, server: RedisServer, raw: redis.Redis, make_cache: Any
    ) -> None:
        """Entries are ``{namespace}:answer:{key}`` and expire after ttl_s."""
        cache = make_cache(server.url, namespace="team-a", ttl_s=60.0)
        await cache.put("k", ANSWER)
        assert raw.keys("*") == [b"team-a:answer:k"]
        assert 0 < raw.pttl("team-a:answer:k") <= 60_000

    async def test_namespaces_do_not_share(self, server: RedisServer, make_cache: Any) -> None:
        """Two deployments on one Redis with different namespaces never see each other."""
        await make_cache(server.url, namespace="a").put("k", ANSWER)
        assert await make_cache(server.url, namespace="b").get("k") is None

    async def test_answers_over_the_size_bound_are_not_stored(
        self, server: RedisServer, raw: redis.Redis, make_cache: Any
    ) -> None:
        """An answer larger than max_value_bytes is skipped, a smaller one stored."""
        cache = make_cache(server.url, max_value_bytes=400)  # the small one takes about 230
        await cache.put("big", Completion("x" * 500, "length", 1, 500))
        await cache.put("small", ANSWER)
        assert raw.keys("*") == [b"ensemble-ops:answer:small"]


class TestSingleFlight:
    async def test_one_replica_claims_the_others_wait_for_its_answer(
        self, server: RedisServer, make_cache: Any
    ) -> None:
        """The first claim wins, a second replica's loses; once the winner stores and
        releases, the waiter gets the answer."""
        a, b = make_cache(server.url), make_cache(server.url)
        assert await a.claim("k")
        assert not await b.claim("k")
        import anyio

        async def answer_later() -> None:
            await anyio.sleep(0.1)
            await a.put("k", ANSWER)
            await a.release("k")

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(answer_later)
            assert await b.wait_for("k") == ANSWER
        assert await b.claim("k")  # released: free to claim again

    async def test_a_holder_that_fails_frees_the_waiters(
        self, server: RedisServer, make_cache: Any
    ) -> None:
        """When the holder releases with no answer, the waiter stops waiting at once and
        generates itself (None)."""
        a, b = make_cache(server.url), make_cache(server.url, lock_wait_s=30.0)
        assert await a.claim("k")
        await a.release("k")
        assert await b.wait_for("k") is None

    async def test_the_wait_is_bounded(self, server: RedisServer, make_cache: Any) -> None:
        """A holder that never answers (a replica that died) keeps no one past lock_wait_s."""
        a, b = make_cache(server.url), make_cache(server.url, lock_wait_s=0.2)
        assert await a.claim("k")
        assert await b.wait_for("k") is None

    async def test_a_lock_expires_and_release_frees_only_its_own(
        self, server: RedisServer, raw: redis.Redis, make_cache: Any
    ) -> None:
        """A claim lasts lock_ttl_s at most; a holder whose lock expired and was taken by
        another replica does not delete that replica's lock."""
        import anyio

        a = make_cache(server.url, lock_ttl_s=0.1)
        b = make_cache(server.url)
        assert await a.claim("k")
        await anyio.sleep(0.2)
        assert await b.claim("k")
        await a.release("k")
        assert raw.exists("ensemble-ops:lock:k")


class TestOutage:
    async def test_an_absent_redis_is_a_miss_and_reported_once(
        self, tmp_path: Path, bus: EventBus, make_cache: Any
    ) -> None:
        """Nothing listening: every operation returns as a miss, the failure is published
        once, later operations skip Redis for a second instead of failing again, and the
        health says degraded with the reason."""
        events = _Events(bus)
        cache = make_cache(RedisServer(tmp_path / "none").url)
        assert await cache.get("k") is None
        await cache.put("k", ANSWER)
        assert await cache.claim("k")  # no Redis, no lock: this replica generates
        await cache.release("k")
        assert await cache.wait_for("k") is None
        assert events.changes() == [False]
        assert len(events.failures()) == 1
        assert events.failures()[0].operation == "get"
        health = await cache.health()
        assert (health.backend, health.up) == ("redis", False)
        assert health.reason is not None
        assert "get:" in health.reason

    async def test_a_frozen_redis_times_out_fast(
        self, server: RedisServer, bus: EventBus, make_cache: Any
    ) -> None:
        """A Redis that accepts but never answers: the operation gives up after timeout_s
        and says it timed out."""
        events = _Events(bus)
        cache = make_cache(server.url, timeout_s=0.05)
        await cache.put("k", ANSWER)  # connected and up
        with server.frozen():
            assert await cache.get("k") is None
        assert events.changes() == [True, False]
        assert events.failures()[0].error == "timed out"

    async def test_it_recovers_by_itself_when_redis_returns(
        self, tmp_path: Path, bus: EventBus, make_cache: Any
    ) -> None:
        """Down, then Redis starts on the same address: the health check (or the next
        operation after the retry interval) finds it and the cache is up again."""
        import anyio

        events = _Events(bus)
        server = RedisServer(tmp_path / "later")
        cache = make_cache(server.url)
        assert not (await cache.health()).up
        server.start()
        try:
            await anyio.sleep(1.1)  # past the retry interval
            assert (await cache.health()).up
            await cache.put("k", ANSWER)
            assert await cache.get("k") == ANSWER
        finally:
            server.kill()
        assert events.changes() == [False, True]
