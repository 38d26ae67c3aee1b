"""Replicas sharing a Redis cache: answers shared by content, one generation per key across
replicas, and a Redis outage that costs no request (real engines, a real redis-server)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from ensemble_ops.config import Settings
from ensemble_ops.errors import ModelUnavailableError
from ensemble_ops.events import CacheBackendChanged, CacheLookedUp, EventBus
from ensemble_ops.serving.cache.redis_cache import RedisCache
from ensemble_ops.serving.engine import Completion, Engine, GenerationParams
from ensemble_ops.serving.ensemble import Ensemble, InferenceRequest, InferenceResult
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.tasks import TaskRunner

from ..conftest import FlakyEngine, GatedEngine
from ..redis_server import RedisServer, redis_server

GREEDY = GenerationParams(max_tokens=6, temperature=0.0, top_p=1.0)
Replica = Callable[..., Ensemble]


def _request(prompt: str = "Hello") -> InferenceRequest:
    return InferenceRequest("tiny", "fast", GREEDY, prompt=prompt)


@pytest.fixture(name="server")
def _server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture(name="engines")
def _engines() -> list[FlakyEngine]:
    return []


@pytest.fixture(name="replica")
async def _replica(
    demo_dir: Path, tmp_path: Path, engines: list[FlakyEngine]
) -> AsyncIterator[Replica]:
    """Builds loaded ensembles (replicas) of one member on the tiny demo model, caching in
    Redis at ``url``; each has its own event bus. Closed afterwards."""
    built: list[tuple[Ensemble, TaskRunner]] = []

    def load(spec: Any) -> Engine:
        engine = FlakyEngine(LlamaEngine.load(spec), failing=False)  # counts calls
        engines.append(engine)
        return engine

    def make(
        url: str,
        *,
        n_ctx: int = 256,
        bus: EventBus | None = None,
        gate: threading.Event | None = None,
        tracer: Tracer | None = None,
        runner: TaskRunner | None = None,
        **cache: Any,
    ) -> Ensemble:
        """``gate``: the replica's engine holds each sequence until it is set (not counted
        in ``engines``); ``tracer``: the replica's request spans; ``runner``: the replica's
        task runner (to stop it as a shutdown does)."""
        settings = Settings.from_mapping(
            {
                "models": [
                    {"name": "tiny", "path": str(demo_dir / "demo-tiny.gguf"), "n_ctx": n_ctx}
                ],
                "cache": {
                    "backend": "redis",
                    "url": url,
                    "timeout_s": 1.0,  # a busy test machine is no Redis fault
                    "digest_file": str(tmp_path / "digests.json"),
                    **cache,
                },
            },
            environ={},
        )
        runner = runner or TaskRunner()

        def load_gated(spec: Any) -> Engine:
            assert gate is not None
            return GatedEngine(LlamaEngine.load(spec), gate)

        loader = load if gate is None else load_gated
        ensemble = Ensemble(settings, bus or EventBus(), loader, runner, tracer=tracer)
        built.append((ensemble, runner))
        return ensemble

    yield make
    for ensemble, runner in built:
        await runner.aclose()
        await ensemble.close(drain_timeout_s=1.0)


class TestSharedAnswers:
    async def test_an_answer_generated_on_one_replica_is_a_hit_on_another(
        self, server: RedisServer, replica: Replica, engines: list[FlakyEngine]
    ) -> None:
        """Replica B answers A's request from Redis with A's text, without generating."""
        a, b = replica(server.url), replica(server.url)
        await a.load_all()
        await b.load_all()
        first = await a.complete(_request())
        # Stored, and the claim A took to generate it freed (no replica waits on it).
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            assert len(await client.keys("*:answer:*")) == 1
            assert await client.keys("*:lock:*") == []
        finally:
            await client.aclose()
        second = await b.complete(_request())
        assert (first.cached, second.cached) == (False, True)
        assert second.completion.text == first.completion.text
        assert [e.calls for e in engines] == [1, 0]

    async def test_streams_and_completions_share_entries_across_replicas(
        self, server: RedisServer, replica: Replica, engines: list[FlakyEngine]
    ) -> None:
        """A stream on replica A is cached in Redis: a stream of it on B is a hit sent as
        one piece, and a completion on B gets the same text and usage, all from one
        generation."""
        a, b = replica(server.url), replica(server.url)
        await a.load_all()
        await b.load_all()
        first = a.answer(_request("Stream me"), incremental=True)
        await first.first()
        streamed = "".join([piece async for piece in first.pieces()])
        second = b.answer(_request("Stream me"), incremental=True)
        await second.first()
        again = "".join([piece async for piece in second.pieces()])
        whole = await b.complete(_request("Stream me"))
        assert (first.cached, second.cached, whole.cached) == (False, True, True)
        assert streamed == again == whole.completion.text
        assert second.result == whole.completion
        assert first.result is not None
        assert (whole.completion.prompt_tokens, whole.completion.completion_tokens) == (
            first.result.prompt_tokens,
            first.result.completion_tokens,
        )
        assert [e.calls for e in engines] == [1, 0]

    async def test_other_settings_that_change_output_never_share(
        self, server: RedisServer, replica: Replica
    ) -> None:
        """A replica serving the same file with another context size has another identity:
        it generates instead of reading the first one's answers."""
        a, wider = replica(server.url), replica(server.url, n_ctx=512)
        await a.load_all()
        await wider.load_all()
        await a.complete(_request())
        assert not (await wider.complete(_request())).cached

    async def test_identical_requests_on_two_replicas_generate_once(
        self, server: RedisServer, replica: Replica, engines: list[FlakyEngine]
    ) -> None:
        """Many identical requests arriving at two replicas together: one generation in
        all (the lock across replicas, single flight within each), everyone gets its text."""
        a, b = replica(server.url), replica(server.url)
        await a.load_all()
        await b.load_all()
        results: list[InferenceResult] = []

        async def ask(ensemble: Ensemble) -> None:
            results.append(await ensemble.complete(_request("Once upon a time")))

        async with anyio.create_task_group() as tasks:
            for _ in range(4):
                tasks.start_soon(ask, a)
                tasks.start_soon(ask, b)
        assert sum(e.calls for e in engines) == 1
        assert sorted(r.cached for r in results) == [False] + [True] * 7
        assert len({r.completion.text for r in results}) == 1


class TestWaitingOnAnotherReplica:
    """Replica B asks for what replica A is generating: B waits on A's claim in Redis. A's
    engine is held at a gate, so B's wait is made by construction, not by timing."""

    @pytest.fixture(name="waiting")
    def _waiting(self, monkeypatch: pytest.MonkeyPatch) -> anyio.Event:
        """Set when a replica starts waiting on another's claim (a spy on the real wait)."""
        started = anyio.Event()
        real_wait = RedisCache.wait_for

        async def wait_for(cache: RedisCache, key: str) -> Completion | None:
            started.set()
            return await real_wait(cache, key)

        monkeypatch.setattr(RedisCache, "wait_for", wait_for)
        return started

    @staticmethod
    async def _a_gated_and_b_traced(
        server: RedisServer, replica: Replica
    ) -> tuple[threading.Event, Ensemble, Ensemble, list[bool], InMemorySpanExporter]:
        """Replica A, whose engine holds each sequence until the gate is set, and replica B,
        whose cache lookups (hit or not) and spans are recorded; both loaded."""
        gate = threading.Event()
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        bus = EventBus()
        lookups: list[bool] = []
        bus.subscribe(CacheLookedUp, lambda e: lookups.append(e.hit))
        a = replica(server.url, gate=gate)
        b = replica(server.url, bus=bus, tracer=provider.get_tracer("test"))
        await a.load_all()
        await b.load_all()
        return gate, a, b, lookups, exporter

    @staticmethod
    async def _cache_label(exporter: InMemorySpanExporter) -> object:
        """The cache label on the one attempt span. The span ends after the answer is sent,
        once the answer is stored in Redis and the claim freed: waited for, not assumed."""
        with anyio.fail_after(10):
            while not (spans := exporter.get_finished_spans()):
                await anyio.sleep(0.01)
        (span,) = spans
        assert span.attributes is not None
        return span.attributes.get("ensemble_ops.cache")

    async def test_the_waiting_replica_gets_the_answer_as_coalesced(
        self,
        server: RedisServer,
        replica: Replica,
        engines: list[FlakyEngine],
        waiting: anyio.Event,
    ) -> None:
        """B generates nothing: it gets A's text once A stores it, counted as a cache hit
        and labelled ``coalesced`` on its span."""
        gate, a, b, lookups, exporter = await self._a_gated_and_b_traced(server, replica)
        results: dict[str, InferenceResult] = {}

        async def ask(name: str, ensemble: Ensemble) -> None:
            results[name] = await ensemble.complete(_request("Shared"))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(ask, "a", a)
                await anyio.to_thread.run_sync(_arrived(a).wait)
                tasks.start_soon(ask, "b", b)
                await waiting.wait()
                gate.set()
        assert (results["a"].cached, results["b"].cached) == (False, True)
        assert results["b"].completion == results["a"].completion
        assert [e.calls for e in engines] == [0]  # B's engine never ran
        assert lookups == [True]
        assert await self._cache_label(exporter) == "coalesced"

    async def test_a_wait_that_ends_empty_is_a_miss_and_generates(
        self,
        server: RedisServer,
        replica: Replica,
        engines: list[FlakyEngine],
        waiting: anyio.Event,
    ) -> None:
        """A's client goes away before A answers: A frees its claim with nothing stored,
        and B stops waiting and generates itself, labelled ``miss``."""
        gate, a, b, lookups, exporter = await self._a_gated_and_b_traced(server, replica)
        results: list[InferenceResult] = []
        a_scope = anyio.CancelScope()

        async def ask_a() -> None:
            with a_scope:
                await a.complete(_request("Shared"))

        async def ask_b() -> None:
            results.append(await b.complete(_request("Shared")))

        try:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(ask_a)
                    await anyio.to_thread.run_sync(_arrived(a).wait)
                    tasks.start_soon(ask_b)
                    await waiting.wait()
                    a_scope.cancel()
        finally:
            gate.set()  # lets the parked sequence end as cancelled
        (result,) = results
        assert not result.cached
        assert [e.calls for e in engines] == [1]
        assert lookups == [False]
        assert await self._cache_label(exporter) == "miss"


class TestShutdown:
    async def test_a_claim_sent_as_the_server_stops_is_remembered_and_freed(
        self, server: RedisServer, replica: Replica, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The claim's SET has reached Redis (frozen, so it is not answered yet) when the
        replica shuts down: the replica waits for the answer, remembers the claim and frees
        it, so no other replica waits on it until it expires; the request is answered 503.
        Nothing is timed: each step waits for the state before it."""
        claiming = anyio.Event()
        freeze = contextlib.ExitStack()
        real_claim = RedisCache.claim

        async def claim(cache: RedisCache, key: str) -> bool:
            freeze.enter_context(server.frozen())
            claiming.set()
            return await real_claim(cache, key)

        monkeypatch.setattr(RedisCache, "claim", claim)
        runner = TaskRunner()
        a = replica(server.url, runner=runner, timeout_s=30.0)  # the freeze is no outage
        await a.load_all()
        failures: list[BaseException] = []

        async def ask() -> None:
            try:
                await a.complete(_request("Stopping"))
            except ModelUnavailableError as err:
                failures.append(err)

        with freeze, anyio.fail_after(30):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(ask)
                await claiming.wait()
                while server.unread_bytes() == 0:
                    await anyio.sleep(0.01)  # until the SET waits in Redis's socket
                tasks.start_soon(runner.aclose)
                await anyio.lowlevel.checkpoint()  # aclose has cancelled the walk
                freeze.close()
        admin = redis.asyncio.Redis.from_url(server.url)
        try:
            assert await admin.keys("*:lock:*") == []
        finally:
            await admin.aclose()
        (failure,) = failures
        assert "shutting down" in str(failure)


def _arrived(ensemble: Ensemble) -> threading.Event:
    """Set when a sequence of ``ensemble``'s gated member has reached its gate."""
    active = ensemble.slots["tiny"].active
    assert active is not None
    assert isinstance(active.engine, GatedEngine)
    return active.engine.arrived


class TestOutage:
    async def test_requests_are_answered_while_redis_is_down_and_it_comes_back(
        self, server: RedisServer, replica: Replica
    ) -> None:
        """Redis killed: requests are answered by the engine (misses), the cache reports
        down with the reason; Redis back on the same port: the cache is used again."""
        bus = EventBus()
        changes: list[bool] = []
        lookups: list[bool] = []
        bus.subscribe(CacheBackendChanged, lambda e: changes.append(e.up))
        bus.subscribe(CacheLookedUp, lambda e: lookups.append(e.hit))
        ensemble = replica(server.url, bus=bus)
        await ensemble.load_all()
        await ensemble.complete(_request())
        server.kill()
        for prompt in ("Hello", "Hi", "Hello"):
            result = await ensemble.complete(_request(prompt))
            assert not result.cached
        health = await ensemble.cache_health()
        assert health is not None
        assert not health.up
        assert health.reason is not None
        server.start()
        await anyio.sleep(1.1)  # one retry interval
        health = await ensemble.cache_health()
        assert health is not None
        assert health.up
        await ensemble.complete(_request("Back"))
        assert (await ensemble.complete(_request("Back"))).cached
        assert changes == [True, False, True]
        assert lookups == [False, False, False, False, False, True]
