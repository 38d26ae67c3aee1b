"""Per-key limits: GCRA buckets on this replica and in a real Redis, in-flight counts, and
Redis outages that degrade to per-replica counting without failing a request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ensemble_ops.access import limits as limits_module
from ensemble_ops.access.keys import ANONYMOUS, Caller
from ensemble_ops.access.limits import BURST_S, Limits, duration
from ensemble_ops.config import ApiKeySpec
from ensemble_ops.events import EventBus, LimitsBackendChanged
from ensemble_ops.serving.guarded_redis import GuardedRedis

from ..conftest import Recorded
from ..redis_server import RedisServer

_HASH = "ab" * 32


def _caller(name: str = "team", **limits: int) -> Caller:
    return Caller(name, ApiKeySpec.model_validate({"name": name, "key_sha256": _HASH, **limits}))


class _Clock:
    """The limits' monotonic clock, moved by the test: the buckets' arithmetic is checked
    over simulated minutes, with no real waiting and nothing left to timing."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture(name="clock")
def _clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(limits_module, "time", clock)
    return clock


class TestRequestsPerMinute:
    async def test_a_burst_then_one_every_interval(self, clock: _Clock) -> None:
        """rpm = 60 holds BURST_S (10 s) worth: 10 at once, the 11th waits a second; then
        one per second."""
        limits, caller = Limits(), _caller(rpm=60)
        burst = [(await limits.admit(caller, 0)).allowed for _ in range(11)]
        assert burst == [True] * 10 + [False]
        refused = await limits.admit(caller, 0)
        assert refused.refused == "requests"
        assert refused.retry_after_s == pytest.approx(1.0)
        clock.now += 1.0
        assert (await limits.admit(caller, 0)).allowed
        assert not (await limits.admit(caller, 0)).allowed

    async def test_no_window_edge_lets_twice_the_rate_through(self, clock: _Clock) -> None:
        """A client sending 10 requests a second for three minutes: in every 60 s window at
        most the rate plus the burst are admitted, and a steady minute admits the rate."""
        limits, caller = Limits(), _caller(rpm=60)
        admitted: list[float] = []
        for tick in range(1800):
            clock.now = 1000.0 + tick * 0.1
            if (await limits.admit(caller, 0)).allowed:
                admitted.append(clock.now)
        windows = [
            sum(start <= t < start + 60 for t in admitted)
            for start in (1000.0 + s for s in range(120))
        ]
        assert max(windows) <= 60 + BURST_S
        assert windows[-1] in (60, 61)  # a steady minute, long after the burst

    async def test_the_quota_headers_count_down(self, clock: _Clock) -> None:
        """OpenAI's view of the bucket: its limit, what is left, and when it is full."""
        limits, caller = Limits(), _caller(rpm=60)
        first = await limits.admit(caller, 0)
        second = await limits.admit(caller, 0)
        assert first.requests is not None
        assert second.requests is not None
        assert (first.requests.limit, first.requests.remaining) == (60, 9)
        assert second.requests.remaining == 8
        assert second.requests.reset_s == pytest.approx(2.0)
        assert (duration(2.0), duration(0.12), duration(360)) == ("2s", "120ms", "6m0s")


class TestTokensPerMinute:
    async def test_admission_reserves_and_the_end_refunds(self, clock: _Clock) -> None:
        """tpm = 60 holds 10 tokens. A request reserving 8 leaves no room for 5 more; once
        it ends having used 2, the 6 it did not use come back and the 5 fit."""
        limits, caller = Limits(), _caller(tpm=60)
        first = await limits.admit(caller, 8)
        assert first.allowed
        assert first.reserved_tokens == 8
        refused = await limits.admit(caller, 5)
        assert (refused.allowed, refused.refused) == (False, "tokens")
        assert refused.retry_after_s == pytest.approx(3.0)
        await limits.finish(caller, reserved=8, used=2)
        assert (await limits.admit(caller, 5)).allowed

    async def test_a_request_larger_than_the_bucket_passes_when_full_and_is_owed(
        self, clock: _Clock
    ) -> None:
        """One answer may cost more than the bucket holds: it is let through when the
        bucket is full, and the debt is paid before the next one."""
        limits, caller = Limits(), _caller(tpm=60)
        assert (await limits.admit(caller, 30)).allowed
        refused = await limits.admit(caller, 1)
        assert refused.retry_after_s == pytest.approx(21.0)
        clock.now += 21.0
        assert (await limits.admit(caller, 1)).allowed


class TestParallel:
    async def test_requests_in_flight(self) -> None:
        """max_parallel = 2: a third is refused until one ends; refusals take nothing."""
        limits, caller = Limits(), _caller(max_parallel=2)
        assert (await limits.admit(caller, 1)).allowed
        assert (await limits.admit(caller, 1)).allowed
        third = await limits.admit(caller, 1)
        assert (third.allowed, third.refused) == (False, "parallel")
        await limits.finish(caller, reserved=1, used=1)
        assert (await limits.admit(caller, 1)).allowed

    async def test_callers_without_a_key_have_no_limits(self) -> None:
        limits = Limits()
        decisions = [await limits.admit(ANONYMOUS, 10**6) for _ in range(100)]
        assert all(d.allowed and d.requests is None for d in decisions)


@pytest.fixture(name="redis")
async def _redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


def _shared(url: str, bus: EventBus) -> Limits:
    guarded = GuardedRedis(
        url,
        0.5,
        on_failed=lambda operation, why: None,
        on_changed=lambda up, why: bus.publish(LimitsBackendChanged(up, why)),
    )
    return Limits(guarded, "test")


class TestShared:
    async def test_two_replicas_enforce_one_limit(self, redis: RedisServer) -> None:
        """rpm = 12 holds two requests: one on each replica takes both, a third on either
        is refused, the wait (5 s per request) coming from Redis' own clock."""
        bus = EventBus()
        first, second = _shared(redis.url, bus), _shared(redis.url, bus)
        caller = _caller(rpm=12)
        try:
            assert (await first.admit(caller, 0)).allowed
            assert (await second.admit(caller, 0)).allowed
            refused = await first.admit(caller, 0)
            assert (refused.allowed, refused.refused) == (False, "requests")
            assert 4.0 < refused.retry_after_s <= 5.0
            assert not (await second.admit(caller, 0)).allowed
        finally:
            for limits in (first, second):
                assert limits.redis is not None
                await limits.redis.aclose()

    async def test_refunds_ride_on_the_next_admission(self, redis: RedisServer) -> None:
        """One round trip per request: the unused tokens of a request go back to Redis with
        its key's next admission on that replica; until then the limit is stricter (the
        other replica is refused), after it the other replica sees the refund."""
        bus = EventBus()
        first, second = _shared(redis.url, bus), _shared(redis.url, bus)
        caller = _caller(tpm=60)  # a bucket of 10 tokens
        try:
            admitted = await first.admit(caller, 8)
            assert admitted.allowed
            assert admitted.shared
            await first.finish(caller, reserved=8, used=2, shared=True)
            assert not (await second.admit(caller, 5)).allowed  # not given back yet
            assert (await first.admit(caller, 1)).allowed  # gives 6 back, takes 1
            assert (await second.admit(caller, 5)).allowed
        finally:
            for limits in (first, second):
                assert limits.redis is not None
                await limits.redis.aclose()

    async def test_an_outage_degrades_to_counting_here(self, redis: RedisServer) -> None:
        """Redis killed: no admission fails for it; this replica counts on its own (the
        limit still holds here), health says degraded, and an event says why."""
        bus = EventBus()
        events = Recorded(bus, LimitsBackendChanged)
        limits = _shared(redis.url, bus)
        caller = _caller(rpm=12)
        try:
            assert (await limits.admit(caller, 0)).allowed
            assert (await limits.health()).up
            redis.kill()
            during = [(await limits.admit(caller, 0)).allowed for _ in range(3)]
            health = await limits.health()
        finally:
            assert limits.redis is not None
            await limits.redis.aclose()
        assert during == [True, True, False]  # this replica's own bucket of two
        assert (health.backend, health.up) == ("redis", False)
        assert health.reason is not None
        assert "admit" in health.reason
        assert [e.up for e in events.seen] == [True, False]
