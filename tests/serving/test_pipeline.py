"""The request path as a whole: fallback to the next member, streams that behave like
completions, the client leaving, and what the engine is asked."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from ensemble_ops.config import ModeName, Settings
from ensemble_ops.errors import (
    DeadlineUnreachableError,
    EngineError,
    InvalidRequestError,
    ModelUnavailableError,
    NoMemberAvailableError,
    OverloadedError,
)
from ensemble_ops.events import EventBus, InferenceFailed, InferenceFinished, ShadowFinished
from ensemble_ops.serving import pipeline
from ensemble_ops.serving.demo import DemoModel, write_model
from ensemble_ops.serving.engine import (
    ChatMessage,
    Completion,
    Engine,
    EngineFailure,
    GenerationParams,
    SequenceHandle,
    SequenceSink,
)
from ensemble_ops.serving.ensemble import Ensemble, TextStream
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.serving.slot import Loaded
from ensemble_ops.tasks import TaskRunner

from ..conftest import EngineWrapper, FailsMidStream, FlakyEngine, GatedEngine, Recorded
from .conftest import MEMBERS, SAMPLED, Engines, EnsembleFactory, Events, members, request


async def _collect(stream: TextStream) -> str:
    await stream.first()
    return "".join([piece async for piece in stream.pieces()])


_E = TypeVar("_E", bound=Engine)


async def _swap_in(ensemble: Ensemble, name: str, wrap: Callable[[LlamaEngine], _E]) -> _E:
    """Serve ``name`` from ``wrap`` of a new real engine on its file; the old copy closed."""
    slot = ensemble.slots[name]
    previous = slot.active
    assert previous is not None
    engine = wrap(LlamaEngine.load(slot.spec))
    slot.install(engine)
    await previous.close()
    return engine


async def _until_idle(loaded: Loaded | None) -> None:
    """Until ``loaded`` has no request in flight: its last lease is released."""
    assert loaded is not None
    with anyio.fail_after(10):
        while loaded.in_flight:
            await anyio.sleep(0.01)


class TestFallback:
    async def test_a_full_member_passes_the_request_to_the_next(
        self, ensemble: Ensemble, events: Events
    ) -> None:
        """A member whose queue is full is skipped; the failed attempt is not the request's
        end, the answer is."""
        held = ensemble.slots["c"].acquire()
        try:
            result = await ensemble.complete(request())
        finally:
            held.release()
        assert result.member == "a"
        failed = events.of(InferenceFailed)
        assert [(f.model, f.error_type, f.final) for f in failed] == [("c", "overloaded", False)]
        assert [f.model for f in events.of(InferenceFinished)] == ["a"]

    async def test_a_failing_member_passes_the_request_to_the_next(
        self, ensemble: Ensemble, engines: Engines, events: Events
    ) -> None:
        """An engine failure on the preferred member: the next one answers."""
        engines.by_name["c"].failing = True
        result = await ensemble.complete(request())
        assert result.member == "a"
        assert engines.by_name["c"].calls == 1
        failed = events.of(InferenceFailed)
        assert [(f.model, f.error_type, f.final) for f in failed] == [("c", "engine_error", False)]
        [attempt] = failed
        assert (attempt.mode, attempt.copy, attempt.key) == ("fast", "stable", "anonymous")
        assert "llama_decode returned -3" in attempt.message
        assert 0 < attempt.latency_s < 60

    async def test_a_named_member_does_not_fall_back(
        self, ensemble: Ensemble, engines: Engines, events: Events
    ) -> None:
        """A request naming a member fails with that member's error, as the final outcome."""
        engines.by_name["b"].failing = True
        with pytest.raises(EngineError, match="llama_decode returned -3"):
            await ensemble.complete(request("b"))
        held = ensemble.slots["a"].acquire()
        try:
            with pytest.raises(OverloadedError):
                await ensemble.complete(request("a"))
        finally:
            held.release()
        assert [(f.model, f.error_type, f.final) for f in events.of(InferenceFailed)] == [
            ("b", "engine_error", True),
            ("a", "overloaded", True),
        ]
        assert engines.by_name["a"].calls == engines.by_name["c"].calls == 0

    async def test_when_no_member_can_serve_each_says_why(
        self, ensemble: Ensemble, engines: Engines, events: Events
    ) -> None:
        """Every member full or failing: one final failure of the ensemble, naming each
        member's reason."""
        engines.by_name["a"].failing = True
        held = [ensemble.slots["c"].acquire()]
        ensemble.slots["b"].unload("reloading")
        try:
            with pytest.raises(NoMemberAvailableError) as refused:
                await ensemble.complete(request())
        finally:
            for lease in held:
                lease.release()
        assert refused.value.reasons == {
            "c": "overloaded",
            "a": "Inference failed on model 'a': llama_decode returned -3",
            "b": "the model is being reloaded (its old copy was unloaded first)",
        }
        finals = [(f.model, f.error_type) for f in events.of(InferenceFailed) if f.final]
        assert finals == [("ensemble", "no_member_available")]

    async def test_a_stream_whose_first_member_fails_is_answered_by_the_next(
        self, ensemble: Ensemble, engines: Engines, events: Events
    ) -> None:
        """A stream falls back like a completion as long as nothing was sent: the preferred
        member fails before its first piece, the next one streams the answer."""
        engines.by_name["c"].failing = True
        stream = ensemble.answer(request(params=SAMPLED), incremental=True)
        text = await _collect(stream)
        assert stream.member == "a"
        assert stream.result is not None
        assert text == stream.result.text
        failed = events.of(InferenceFailed)
        assert [(f.model, f.error_type, f.final) for f in failed] == [("c", "engine_error", False)]
        assert [(f.model, f.stream) for f in events.of(InferenceFinished)] == [("a", True)]

    async def test_a_stream_that_fails_after_its_first_piece_ends_with_the_error(
        self, make_ensemble: EnsembleFactory, events: Events
    ) -> None:
        """Past the first piece there is no fallback: the stream ends with the error, which
        is the request's final outcome."""
        ensemble = make_ensemble()
        await ensemble.load_all()
        slot = ensemble.slots["c"]
        active = slot.active
        assert active is not None
        slot.install(FailsMidStream(LlamaEngine.load(slot.spec)))
        stream = ensemble.answer(request(params=SAMPLED), incremental=True)
        await stream.first()
        pieces: list[str] = []

        async def read() -> None:
            async for piece in stream.pieces():
                pieces.append(piece)

        with pytest.raises(EngineError, match="decode failed mid-way"):
            await read()
        assert pieces == ["partial"]
        assert stream.member == "c"
        failed = [(f.model, f.final) for f in events.of(InferenceFailed)]
        assert failed == [("c", True)]
        await active.close()


class _PausesAfterFirstPiece(EngineWrapper):
    """A real engine whose thread stops after its first piece until ``resume``: the client
    then leaves mid-answer by construction, not by a race with a fast model."""

    def __init__(self, real: LlamaEngine) -> None:
        super().__init__(real)
        self.resume = threading.Event()

    def submit(
        self,
        tokens: list[int],
        params: GenerationParams,
        sink: SequenceSink,
        **options: Any,
    ) -> SequenceHandle:
        resume = self.resume

        class Pausing:
            def piece(self, text: str) -> None:
                sink.piece(text)
                resume.wait(timeout=30)

            def end(self, outcome: Completion | EngineFailure) -> None:
                sink.end(outcome)

        return super().submit(tokens, params, Pausing(), **options)


def _is_cancelled(event: InferenceFinished, *, stream: bool) -> None:
    """A cancelled request's record: its mode, copy and caller, no prompt counted as
    answered, never a cache hit, and how long it ran."""
    assert (event.mode, event.copy, event.key) == ("fast", "stable", "anonymous")
    assert (event.prompt_tokens, event.cached, event.stream) == (0, False, stream)
    assert 0 < event.latency_s < 60


class TestStreams:
    async def test_a_stream_starts_on_the_first_member_that_can_take_it(
        self, ensemble: Ensemble, events: Events
    ) -> None:
        """A stream skips a full member, yields the text, and frees the member at the end."""
        held = ensemble.slots["c"].acquire()
        try:
            stream = ensemble.answer(request(params=SAMPLED), incremental=True)
            text = await _collect(stream)
        finally:
            held.release()
        assert stream.member == "a"
        assert stream.result is not None
        assert text == stream.result.text
        await _until_idle(ensemble.slots["a"].active)
        finished = events.of(InferenceFinished)
        assert [(f.model, f.stream, f.outcome) for f in finished] == [("a", True, "success")]
        ttft = finished[0].time_to_first_token_s
        assert ttft is not None
        assert 0 < ttft <= finished[0].latency_s

    async def test_a_stream_no_member_can_take_fails_before_it_starts(
        self, ensemble: Ensemble, events: Events
    ) -> None:
        """With every member full, the stream fails before any text (so the client gets a
        503, not a 200 with an error inside)."""
        held = [ensemble.slots[name].acquire() for name in MEMBERS]
        try:
            with pytest.raises(NoMemberAvailableError):
                await ensemble.answer(request(), incremental=True).first()
            with pytest.raises(OverloadedError):
                await ensemble.answer(request("b"), incremental=True).first()
        finally:
            for lease in held:
                lease.release()
        finals = [f for f in events.of(InferenceFailed) if f.final]
        assert [(f.model, f.mode, f.error_type, f.copy, f.key) for f in finals] == [
            ("ensemble", "fast", "no_member_available", "stable", "anonymous"),
            ("b", "fast", "overloaded", "stable", "anonymous"),
        ]
        assert all(f.message and 0 < f.latency_s < 60 for f in finals)

    async def test_a_stream_the_client_leaves_stops_and_frees_the_member(
        self, make_ensemble: EnsembleFactory, events: Events
    ) -> None:
        """Closing the stream stops generation at the next step: the member is free again,
        the outcome is cancelled, and far fewer tokens than asked were made."""
        ensemble = make_ensemble()
        await ensemble.load_all()
        paused = await _swap_in(ensemble, "b", _PausesAfterFirstPiece)
        long = GenerationParams(max_tokens=200, temperature=0.9, top_p=1.0)
        stream = ensemble.answer(request("b", long), incremental=True)
        await stream.first()
        stream.close()  # while the engine is held after its first piece
        paused.resume.set()
        await _until_idle(ensemble.slots["b"].active)
        with anyio.fail_after(10):
            while not events.of(InferenceFinished):
                await anyio.sleep(0.01)
        finished = events.of(InferenceFinished)
        assert [(f.model, f.outcome) for f in finished] == [("b", "cancelled")]
        assert finished[0].completion_tokens < 10
        _is_cancelled(finished[0], stream=True)

    async def test_a_completion_the_caller_stops_waiting_for_is_cancelled(
        self, make_ensemble: EnsembleFactory, events: Events
    ) -> None:
        """A non-streamed request whose caller goes away (its client disconnected) cancels
        its sequence in the engine; the outcome is cancelled."""
        ensemble = make_ensemble()
        await ensemble.load_all()
        gated = await _swap_in(ensemble, "b", GatedEngine)
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(ensemble.complete, request("b"))
                with anyio.fail_after(10):
                    while not gated.arrived.is_set():
                        await anyio.sleep(0.01)
                scope.cancel()  # the caller leaves while its sequence is in the engine
        gated.release.set()
        await _until_idle(ensemble.slots["b"].active)
        with anyio.fail_after(10):
            while not events.of(InferenceFinished):
                await anyio.sleep(0.01)
        assert [(f.model, f.outcome) for f in events.of(InferenceFinished)] == [("b", "cancelled")]
        _is_cancelled(events.of(InferenceFinished)[0], stream=False)

    async def test_a_stream_that_fails_before_any_text_raises_its_error(
        self, ensemble: Ensemble, engines: Engines
    ) -> None:
        """An engine failure before the first piece is raised by first()."""
        engines.by_name["b"].failing = True
        stream = ensemble.answer(request("b"), incremental=True)
        with pytest.raises(EngineError):
            await stream.first()
        stream.close()
        await _until_idle(ensemble.slots["b"].active)

    async def test_a_closed_ensemble_refuses_streams_too(self, ensemble: Ensemble) -> None:
        """After close(), a stream fails before any text with the member's reason."""
        await ensemble.close(drain_timeout_s=1.0)
        with pytest.raises(ModelUnavailableError, match="not loaded"):
            await ensemble.answer(request("a"), incremental=True).first()


class TestEveryAnswerEnds:
    async def test_a_stage_that_breaks_ends_the_answer_with_its_error(
        self, ensemble: Ensemble, engines: Engines, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bug in a stage (here: in reporting a request no member could answer) ends the
        answer with its error, a 500 for the client, instead of leaving it waiting."""

        def broken(*args: Any) -> None:
            raise RuntimeError("a bug in a stage")

        monkeypatch.setattr(pipeline, "report_unanswered", broken)
        for name in MEMBERS:
            engines.by_name[name].failing = True
        with anyio.fail_after(10):
            with pytest.raises(RuntimeError, match="a bug in a stage"):
                await ensemble.complete(request())
            with pytest.raises(RuntimeError, match="a bug in a stage"):
                await ensemble.answer(request(), incremental=True).first()

    async def test_an_answer_cancelled_by_a_shutdown_ends_with_a_503(
        self, ensemble_settings: Settings, bus: EventBus, engines: Engines
    ) -> None:
        """The server stopping cancels the walks still running: their answers end with a
        retryable refusal, not silence."""
        runner = TaskRunner()
        ensemble = Ensemble(ensemble_settings, bus, engines, runner)
        await ensemble.load_all()
        gated = await _swap_in(ensemble, "b", GatedEngine)
        try:
            stream = ensemble.answer(request("b"), incremental=True)
            await anyio.to_thread.run_sync(gated.arrived.wait)
            with anyio.fail_after(10):
                await runner.aclose()
                with pytest.raises(ModelUnavailableError, match=r"'b' cannot serve.*shutting down"):
                    await stream.first()
        finally:
            gated.release.set()
            await ensemble.close(drain_timeout_s=1.0)


class TestWhatTheEngineIsAsked:
    async def test_chat_messages_use_the_template_and_its_stop_strings(
        self, make_ensemble: EnsembleFactory, engines: Engines, tmp_path: Path
    ) -> None:
        """A chat request is rendered for the member and stops at the end of its turn as well
        as at the request's own stop strings, each once."""
        model = DemoModel("untemplated", 64, 2, 192, 4, seed=1, chat_template="")
        ensemble = make_ensemble(members(write_model(model, tmp_path / model.filename)))
        await ensemble.load_all()
        member = engines.by_name["a"]
        chat = (ChatMessage("user", "Hello"),)
        prompt = member.render_chat(chat)
        assert prompt.stop == ("\nuser:", "\nsystem:")  # turn markers of the transcript
        own = GenerationParams(4, 0.0, 1.0, stop=("!", "\nuser:"))
        result = await ensemble.complete(request("a", own, prompt=None, messages=chat))
        asked, _ = member.asked[-1]
        assert asked.stop == ("!", "\nuser:", "\nsystem:")
        assert (asked.max_tokens, asked.temperature, asked.top_p) == (4, 0.0, 1.0)
        assert result.completion.prompt_tokens == len(prompt.tokens)
        assert result.completion.text == member.real.complete(prompt.tokens, asked).text

    async def test_a_completion_sends_the_prompt_unchanged(
        self, ensemble: Ensemble, engines: Engines
    ) -> None:
        """A plain prompt is tokenized as it is, with the request's parameters."""
        params = GenerationParams(4, 0.0, 1.0, stop=("x",))
        result = await ensemble.complete(request("a", params, prompt="Hello there"))
        assert engines.by_name["a"].asked == [(params, 2.5)]
        assert result.completion.prompt_tokens == len(engines.by_name["a"].tokenize("Hello there"))

    async def test_a_keyed_callers_turn_reaches_the_engine(
        self, ensemble: Ensemble, engines: Engines
    ) -> None:
        """A keyed request takes turns as its caller, by its weight; without keys every
        request is the one anonymous caller of weight 1."""
        await ensemble.complete(replace(request("a", SAMPLED), caller="ops", weight=3.0))
        await ensemble.complete(request("a", SAMPLED))
        assert engines.by_name["a"].turns == [("ops", 3.0), ("", 1.0)]

    @pytest.mark.parametrize(
        ("mode", "target_s"), [("fast", 2.5), ("balanced", 3.0), ("creative", 4.0)]
    )
    async def test_each_mode_gets_its_place_in_the_admission_order(
        self, ensemble: Ensemble, engines: Engines, mode: ModeName, target_s: float
    ) -> None:
        """Each request is admitted by its deadline, arrival + its mode's latency target
        (fast 2.5 s, balanced 3 s, creative 4 s), streamed or not: fast overtakes creative
        requests that arrived up to 1.5 s before it, and nothing is starved."""
        await ensemble.complete(request("b", SAMPLED, mode=mode))
        assert await _collect(ensemble.answer(request("b", SAMPLED, mode=mode), incremental=True))
        assert [head for _, head in engines.by_name["b"].asked] == [target_s] * 2


class _FarBehind(EngineWrapper):
    """A real engine whose queue is said to be ``wait_s`` long: the state of a member far
    behind under load, which a test cannot make on demand without the load."""

    def __init__(self, real: LlamaEngine, wait_s: float) -> None:
        super().__init__(real)
        self.wait_s = wait_s
        self.submitted = 0

    def expected_wait_s(self, target_s: float) -> float:
        return self.wait_s

    def submit(
        self,
        tokens: list[int],
        params: GenerationParams,
        sink: SequenceSink,
        **options: Any,
    ) -> SequenceHandle:
        self.submitted += 1
        return super().submit(tokens, params, sink, **options)


class TestLatencyTargets:
    async def test_a_request_that_cannot_start_in_time_is_refused_at_once(
        self, make_ensemble: EnsembleFactory, events: Events
    ) -> None:
        """A member with 6 s of work ahead cannot start a fast request (2.5 s target): 503
        with a Retry-After for the rest of the wait, nothing submitted; with the ensemble
        the next member answers instead."""
        ensemble = make_ensemble()
        await ensemble.load_all()
        behind = await _swap_in(ensemble, "c", lambda real: _FarBehind(real, wait_s=6.0))
        with pytest.raises(DeadlineUnreachableError, match="model 'c' cannot start") as refused:
            await ensemble.complete(request("c", mode="fast"))
        assert refused.value.retry_after_s == 4  # 6 s of work, 2.5 s of target
        assert behind.submitted == 0
        assert (await ensemble.complete(request(mode="fast"))).member == "a"
        failed = [(f.model, f.error_type, f.final) for f in events.of(InferenceFailed)]
        assert failed == [("c", "deadline_unreachable", True), ("c", "deadline_unreachable", False)]

    async def test_a_longer_target_can_wait_longer(self, make_ensemble: EnsembleFactory) -> None:
        """The same 3.5 s of work ahead refuses a fast request but not a creative one (4 s)."""
        ensemble = make_ensemble()
        await ensemble.load_all()
        await _swap_in(ensemble, "b", lambda real: _FarBehind(real, wait_s=3.5))
        with pytest.raises(DeadlineUnreachableError):
            await ensemble.complete(request("b", mode="fast"))
        assert (await ensemble.complete(request("b", mode="creative"))).member == "b"


@asynccontextmanager
async def _candidate(
    ensemble: Ensemble, engine: Engine, *, weight_percent: float = 0.0, shadow: float = 0.0
) -> AsyncIterator[Loaded]:
    """``engine`` offered as member a's rollout candidate, with room for one request;
    withdrawn and closed afterwards."""
    candidate = Loaded("a", engine, queue_size=0)
    slot = ensemble.slots["a"]
    slot.offer(candidate, weight_percent=weight_percent, shadow=shadow)
    try:
        yield candidate
    finally:
        slot.withdraw()
        await candidate.close()


class TestARolloutsCandidate:
    """The rollout's copy choice, retry and mirroring on a member with a candidate."""

    @pytest.fixture(name="cannot_chat")
    def _cannot_chat(self, tmp_path: Path) -> LlamaEngine:
        """A file without a chat template: the candidate of a rollout allowed to drop chat."""
        model = DemoModel("untemplated", 64, 2, 192, 4, seed=1, chat_template="")
        return LlamaEngine.load(members(write_model(model, tmp_path / model.filename)).models[0])

    async def test_it_answers_only_what_it_can_unless_asked_for(
        self, ensemble: Ensemble, events: Events, cannot_chat: LlamaEngine
    ) -> None:
        """Chat stays on the stable copy, text goes to the candidate, and a chat that asks
        for the candidate gets it (the named copy's plain transcript), not the stable copy's
        cached answer to the same chat."""
        chat = request("a", prompt=None, messages=(ChatMessage("user", "Hello"),))
        async with _candidate(ensemble, cannot_chat, weight_percent=100):
            for asked in (chat, request("a"), replace(chat, copy="candidate")):
                await ensemble.complete(asked)
        copies = [(finished.copy, finished.cached) for finished in events.of(InferenceFinished)]
        assert copies == [("stable", False), ("candidate", False), ("candidate", False)]

    async def test_asking_for_a_candidate_no_rollout_serves_is_the_requests_mistake(
        self, ensemble: Ensemble, events: Events
    ) -> None:
        """A 400 naming the header, reported as the request's own mistake on the stable
        copy's line (no copy was chosen)."""
        with pytest.raises(InvalidRequestError, match="X-Ensemble-Copy asks for the new copy"):
            await ensemble.complete(replace(request("a"), copy="candidate"))
        (failed,) = events.of(InferenceFailed)
        assert (failed.model, failed.error_type, failed.final, failed.copy) == (
            "a",
            "invalid_value",
            True,
            "stable",
        )

    async def test_a_full_candidate_leaves_the_request_to_the_stable_copy(
        self, ensemble: Ensemble, events: Events, cannot_chat: LlamaEngine
    ) -> None:
        """With the candidate's one place taken, its draw is answered by the stable copy; a
        request that asked for the candidate is refused as overloaded instead."""
        async with _candidate(ensemble, cannot_chat, weight_percent=100):
            held = ensemble.slots["a"].acquire("candidate")
            try:
                await ensemble.complete(request("a"))
                with pytest.raises(OverloadedError):
                    await ensemble.complete(replace(request("a"), copy="candidate"))
            finally:
                held.release()
        assert [finished.copy for finished in events.of(InferenceFinished)] == ["stable"]

    async def test_a_candidate_failing_before_any_text_is_retried_on_the_stable_copy(
        self,
        make_ensemble: EnsembleFactory,
        events: Events,
        provider: TracerProvider,
        exporter: InMemorySpanExporter,
    ) -> None:
        """The candidate's failure is recorded as not final and the stable copy answers the
        same member within the same span, which ends well; a request that asked for the
        candidate gets the failure itself, on its span too."""
        ensemble = make_ensemble(tracer=provider.get_tracer("test"))
        await ensemble.load_all()
        failing = FlakyEngine(LlamaEngine.load(ensemble.slots["a"].spec))
        async with _candidate(ensemble, failing, weight_percent=100):
            answered = await ensemble.complete(request("a"))
            with pytest.raises(EngineError):
                await ensemble.complete(replace(request("a"), copy="candidate"))
        assert answered.member == "a"
        assert [(f.copy, f.final, f.error_type) for f in events.of(InferenceFailed)] == [
            ("candidate", False, "engine_error"),
            ("candidate", True, "engine_error"),
        ]
        assert [finished.copy for finished in events.of(InferenceFinished)] == ["stable"]
        assert failing.calls == 2
        retried, refused = exporter.get_finished_spans()
        assert retried.status.status_code != StatusCode.ERROR
        assert "error.type" not in (retried.attributes or {})
        assert refused.status.status_code == StatusCode.ERROR
        assert (refused.attributes or {})["error.type"] == "engine_error"

    async def test_a_shadow_is_sent_each_answered_request_and_its_answer_dropped(
        self, ensemble: Ensemble, events: Events, bus: EventBus
    ) -> None:
        """The user's answer comes from the stable copy; the same request then runs on the
        candidate (the same file here, so the same tokens), reported only to the rollout."""
        shadows = Recorded(bus, ShadowFinished)
        mirror = FlakyEngine(LlamaEngine.load(ensemble.slots["a"].spec), failing=False)
        async with _candidate(ensemble, mirror, shadow=100):
            answered = await ensemble.complete(request("a"))
            with anyio.fail_after(10):
                while not shadows.seen:
                    await anyio.sleep(0.01)
        (shadow,) = shadows.seen
        assert (shadow.model, shadow.error_type, shadow.empty) == ("a", None, False)
        assert shadow.completion_tokens == answered.completion.completion_tokens
        assert shadow.time_to_first_token_s is not None
        assert 0 < shadow.time_to_first_token_s <= shadow.latency_s
        assert [finished.copy for finished in events.of(InferenceFinished)] == ["stable"]
        assert mirror.calls == 1  # on the candidate, not the stable copy

    async def test_a_shadows_share_of_requests_is_mirrored(
        self, ensemble: Ensemble, bus: EventBus
    ) -> None:
        """At 50%, about half the answered requests are mirrored (each mirror ends before
        the next request, so none is missed for a busy candidate)."""
        shadows = Recorded(bus, ShadowFinished)
        mirror = LlamaEngine.load(ensemble.slots["a"].spec)
        asked = request("a", SAMPLED)
        async with _candidate(ensemble, mirror, shadow=50) as candidate:
            for _ in range(100):
                await ensemble.complete(asked)
                await _until_idle(candidate)
        assert 25 < len(shadows.seen) < 75  # binomial(100, 0.5): 5 standard deviations
