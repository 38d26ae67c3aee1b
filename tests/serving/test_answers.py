"""Answering from what is known: the response cache and single flight, the same for
streamed and non-streamed requests."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from ensemble_ops.config import ModelSpec, Settings
from ensemble_ops.errors import EngineError
from ensemble_ops.events import CacheLookedUp, InferenceFailed, InferenceFinished
from ensemble_ops.serving.answers import KnownAnswers
from ensemble_ops.serving.cache import cache_key
from ensemble_ops.serving.engine import GenerationParams
from ensemble_ops.serving.ensemble import (
    Ensemble,
    InferenceRequest,
    InferenceResult,
    TextStream,
)
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.serving.slot import Loaded

from .conftest import SAMPLED, Engines, EnsembleFactory, Events, members, request


async def _collect(stream: TextStream) -> str:
    await stream.first()
    return "".join([piece async for piece in stream.pieces()])


class TestStreamsAndCompletions:
    async def test_a_repeated_stream_is_a_cache_hit_like_a_completion(
        self, ensemble: Ensemble, engines: Engines, events: Events
    ) -> None:
        """A deterministic stream repeated is answered from the cache, as one piece with the
        same text and usage; a completion of it is a hit too, and the other way round."""
        first = ensemble.answer(request("a"), incremental=True)
        text = await _collect(first)
        second = ensemble.answer(request("a"), incremental=True)
        again = await _collect(second)
        collected = ensemble.answer(request("a"), incremental=False)
        whole = await collected.wait()
        assert (first.cached, second.cached, collected.cached) == (False, True, True)
        assert again == text == whole.text
        assert second.result == first.result == whole
        assert second.produced == 1  # the cached text in one piece
        assert collected.produced == 0  # not streamed: only the end
        assert engines.by_name["a"].calls == 1
        assert [e.hit for e in events.of(CacheLookedUp)] == [False, True, True]
        finished = [(f.stream, f.cached) for f in events.of(InferenceFinished)]
        assert finished == [(True, False), (True, True), (False, True)]

    async def test_a_stream_is_answered_from_a_completions_entry(
        self, ensemble: Ensemble, engines: Engines
    ) -> None:
        """A completion cached first answers a later stream of the same request."""
        whole = await ensemble.complete(request("b"))
        stream = ensemble.answer(request("b"), incremental=True)
        assert await _collect(stream) == whole.completion.text
        assert stream.cached
        assert stream.result == whole.completion
        assert engines.by_name["b"].calls == 1


class TestSingleFlight:
    async def test_identical_requests_in_flight_share_one_generation(
        self, ensemble: Ensemble, engines: Engines, events: Events
    ) -> None:
        """A deterministic request identical to one still running waits for its answer
        instead of generating again, and counts as a cache hit."""
        results = []

        async def ask() -> None:
            results.append(await ensemble.complete(request("a")))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ask)
            tasks.start_soon(ask)
        assert engines.by_name["a"].calls == 1
        assert [r.cached for r in results] == [False, True]
        assert results[0].completion == results[1].completion
        assert [e.hit for e in events.of(CacheLookedUp)] == [False, True]
        assert [f.cached for f in events.of(InferenceFinished)] == [False, True]

    async def test_requests_that_differ_do_not_wait_for_each_other(
        self, make_ensemble: EnsembleFactory, engines: Engines, demo_dir: Path
    ) -> None:
        """Other parameters, another prompt or a sampled request: each generates; the same
        request to another member on the same weights shares the generation."""
        ensemble = make_ensemble(members(demo_dir / "demo-tiny.gguf", queue_size=3))
        await ensemble.load_all()
        longer = GenerationParams(max_tokens=5, temperature=0.0, top_p=1.0)
        asked = [
            request("a"),
            request("a", longer),
            request("a", prompt="Hi"),
            request("a", SAMPLED),
            request("b"),
        ]
        results: dict[InferenceRequest, InferenceResult] = {}

        async def ask(one: InferenceRequest) -> None:
            results[one] = await ensemble.complete(one)

        async with anyio.create_task_group() as tasks:
            for one in asked:
                tasks.start_soon(ask, one)
        assert [results[r].cached for r in asked] == [False, False, False, False, True]
        assert (engines.by_name["a"].calls, engines.by_name["b"].calls) == (4, 0)

    async def test_when_the_first_fails_the_one_waiting_generates_itself(
        self, ensemble: Ensemble, engines: Engines
    ) -> None:
        """A waiting request whose leader failed is not failed with it: it runs on its own."""
        engines.by_name["a"].fail_next = 1
        outcomes: list[object] = []

        async def ask() -> None:
            try:
                outcomes.append(await ensemble.complete(request("a")))
            except EngineError as err:
                outcomes.append(err)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ask)
            tasks.start_soon(ask)
        assert isinstance(outcomes[0], EngineError)
        answer = outcomes[1]
        assert isinstance(answer, InferenceResult)
        assert not answer.cached
        assert engines.by_name["a"].calls == 2
        assert (await ensemble.complete(request("a"))).cached  # the success was cached

    async def test_when_the_first_is_cancelled_the_one_waiting_does_not_hang(
        self, ensemble: Ensemble, engines: Engines
    ) -> None:
        """A leader whose client went away still releases those waiting for it."""
        results: list[InferenceResult] = []

        async def leader(scope: anyio.CancelScope) -> None:
            with scope:
                await ensemble.complete(request("a"))

        async def follower() -> None:
            results.append(await ensemble.complete(request("a")))

        scope = anyio.CancelScope()
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(leader, scope)
                tasks.start_soon(follower)
                await anyio.lowlevel.checkpoint()
                scope.cancel()
        assert len(results) == 1
        assert results[0].completion.completion_tokens == 4

    async def test_an_identical_stream_is_fed_by_the_request_in_flight(
        self, ensemble: Ensemble, engines: Engines, events: Events
    ) -> None:
        """A deterministic stream identical to a request in flight gets that answer's text,
        counted as a cached streamed answer, without a second generation."""
        results: list[InferenceResult] = []

        async def ask() -> None:
            results.append(await ensemble.complete(request("a")))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ask)
            await anyio.lowlevel.checkpoint()
            stream = ensemble.answer(request("a"), incremental=True)
            text = await _collect(stream)
        assert engines.by_name["a"].calls == 1
        assert stream.member == "a"
        assert text == results[0].completion.text
        assert stream.result == results[0].completion
        finished = [(f.stream, f.cached) for f in events.of(InferenceFinished)]
        assert sorted(finished) == [(False, False), (True, True)]

    async def test_a_stream_whose_leader_failed_generates_itself(
        self, ensemble: Ensemble, engines: Engines, events: Events
    ) -> None:
        """A stream waiting for an identical request that fails is not failed with it: it
        generates itself, as a completion would."""
        engines.by_name["a"].fail_next = 1

        async def ask() -> None:
            with pytest.raises(EngineError):
                await ensemble.complete(request("a"))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ask)
            await anyio.lowlevel.checkpoint()
            stream = ensemble.answer(request("a"), incremental=True)
            text = await _collect(stream)
        assert stream.result is not None
        assert text == stream.result.text
        assert not stream.cached
        assert engines.by_name["a"].calls == 2
        assert [(f.model, f.final) for f in events.of(InferenceFailed)] == [("a", True)]

    async def test_a_request_joins_an_identical_stream_in_flight(
        self, ensemble: Ensemble, engines: Engines
    ) -> None:
        """A deterministic stream leads too: an identical request arriving while it
        generates gets the stream's whole answer."""
        long = GenerationParams(max_tokens=240, temperature=0.0, top_p=1.0)
        stream = ensemble.answer(request("a", long), incremental=True)
        await stream.first()
        joined = await ensemble.complete(request("a", long))
        text = "".join([piece async for piece in stream.pieces()])
        assert joined.cached
        assert joined.completion == stream.result
        assert joined.completion.text == text
        assert engines.by_name["a"].calls == 1


class TestCache:
    async def test_a_repeated_deterministic_request_is_answered_from_the_cache(
        self, ensemble: Ensemble, engines: Engines, events: Events
    ) -> None:
        """The second identical temperature-0 request never reaches the engine."""
        first = await ensemble.complete(request())
        second = await ensemble.complete(request())
        assert (first.cached, second.cached) == (False, True)
        assert second.completion == first.completion
        assert engines.by_name["c"].calls == 1
        assert [(e.model, e.hit) for e in events.of(CacheLookedUp)] == [
            ("c", False),
            ("c", True),
        ]
        finished = events.of(InferenceFinished)
        assert [(f.cached, f.engine_s == 0.0) for f in finished] == [(False, False), (True, True)]

    async def test_sampled_requests_are_never_cached(
        self, ensemble: Ensemble, engines: Engines, events: Events
    ) -> None:
        """Without temperature 0 or a seed, each request runs; a seed makes it cacheable."""
        for _ in range(2):
            assert not (await ensemble.complete(request(params=SAMPLED))).cached
        assert engines.by_name["c"].calls == 2
        assert events.of(CacheLookedUp) == []
        seeded = GenerationParams(max_tokens=4, temperature=0.9, top_p=1.0, seed=7)
        results = [await ensemble.complete(request(params=seeded)) for _ in range(2)]
        assert [r.cached for r in results] == [False, True]

    async def test_a_cached_answer_belongs_to_the_weights_and_the_parameters(
        self, make_ensemble: EnsembleFactory, demo_dir: Path
    ) -> None:
        """Members on the same file and settings share answers; other parameters, another
        prompt, or a member on other weights or another context size is a miss."""
        settings = Settings.from_mapping(
            {
                "models": [
                    {"name": "a", "path": str(demo_dir / "demo-tiny.gguf"), "n_ctx": 256},
                    {"name": "b", "path": str(demo_dir / "demo-tiny.gguf"), "n_ctx": 256},
                    {"name": "wider", "path": str(demo_dir / "demo-tiny.gguf"), "n_ctx": 512},
                    {"name": "other", "path": str(demo_dir / "demo-small.gguf"), "n_ctx": 256},
                ]
            },
            environ={},
        )
        ensemble = make_ensemble(settings)
        await ensemble.load_all()
        await ensemble.complete(request("a"))
        assert (await ensemble.complete(request("b"))).cached
        assert not (await ensemble.complete(request("wider"))).cached
        assert not (await ensemble.complete(request("other"))).cached
        longer = GenerationParams(max_tokens=5, temperature=0.0, top_p=1.0)
        assert not (await ensemble.complete(request("a", longer))).cached
        assert not (await ensemble.complete(request("a", prompt="Hello!"))).cached
        assert (await ensemble.complete(request("a"))).cached

    async def test_a_new_copy_answers_from_the_cache_only_with_the_same_weights(
        self, ensemble: Ensemble, demo_dir: Path, tmp_path: Path
    ) -> None:
        """A swap to a copy of the same bytes keeps the cached answers (same identity); a
        swap to other weights under the same name and path never serves the old text."""
        await ensemble.complete(request("a"))
        slot = ensemble.slots["a"]
        old = slot.active
        assert old is not None
        same = slot.install(
            LlamaEngine.load(slot.spec),
            await anyio.to_thread.run_sync(ensemble.identify, slot.spec),
        )
        await old.close()
        assert (await ensemble.complete(request("a"))).cached
        other_spec = ModelSpec(name="a", path=demo_dir / "demo-small.gguf", n_ctx=256)
        other = slot.install(
            LlamaEngine.load(other_spec),
            await anyio.to_thread.run_sync(ensemble.identify, other_spec),
        )
        await same.close()
        try:
            assert not (await ensemble.complete(request("a"))).cached
            assert (await ensemble.complete(request("a"))).cached
        finally:
            assert other is slot.active

    async def test_a_failed_request_is_not_cached(
        self, ensemble: Ensemble, engines: Engines
    ) -> None:
        """A request that failed runs again next time."""
        engines.by_name["b"].failing = True
        with pytest.raises(EngineError):
            await ensemble.complete(request("b"))
        engines.by_name["b"].failing = False
        assert not (await ensemble.complete(request("b"))).cached

    async def test_a_disabled_cache_caches_nothing(
        self, make_ensemble: EnsembleFactory, ensemble_settings: Settings, engines: Engines
    ) -> None:
        """cache.enabled = false: every request reaches the engine."""
        settings = ensemble_settings.model_copy(
            update={"cache": ensemble_settings.cache.model_copy(update={"enabled": False})}
        )
        ensemble = make_ensemble(settings)
        await ensemble.load_all()
        for _ in range(2):
            assert not (await ensemble.complete(request("a"))).cached
        assert engines.by_name["a"].calls == 2


class TestKeys:
    async def test_only_a_copy_with_an_identity_keys_deterministic_requests(
        self, ensemble: Ensemble
    ) -> None:
        """A copy whose file could not be identified when it loaded caches nothing, nor
        does a member without a copy, a sampled request or an ensemble without a cache; a
        copy with an identity keys a deterministic request by it."""
        known = KnownAnswers(ensemble.cache)
        active = ensemble.slots["a"].active
        assert active is not None
        assert active.identity is not None
        unidentified = Loaded("a", active.engine)  # the same engine, closed with the member
        asked = request("a")
        assert known.key(active, asked) == cache_key(
            active.identity, asked.prompt, asked.messages, asked.params
        )
        assert known.key(unidentified, asked) is None
        assert known.key(None, asked) is None
        assert known.key(active, request("a", SAMPLED)) is None
        assert KnownAnswers(None).key(active, asked) is None
