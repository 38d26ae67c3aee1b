"""The ensemble on its own: routing order, fallback, the response cache, loading and closing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from ensemble_ops.config import ModelSpec, ModeName, Settings
from ensemble_ops.errors import (
    ContextLengthExceededError,
    EngineError,
    ModelNotFoundError,
    ModelUnavailableError,
    NoMemberAvailableError,
    OverloadedError,
)
from ensemble_ops.events import (
    CacheLookedUp,
    EventBus,
    InferenceFailed,
    InferenceFinished,
    ModelLoaded,
    ModelLoadFailed,
    ModelUnloaded,
)
from ensemble_ops.serving.demo import DemoModel, write_model
from ensemble_ops.serving.engine import (
    ChatMessage,
    Completion,
    Engine,
    GenerationParams,
    OnText,
)
from ensemble_ops.serving.ensemble import Ensemble, InferenceRequest, InferenceResult
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.tasks import TaskRunner

from ..conftest import FlakyEngine, Recorded

MEMBERS = ("a", "b", "c")
GREEDY = GenerationParams(max_tokens=4, temperature=0.0, top_p=1.0)
SAMPLED = GenerationParams(max_tokens=4, temperature=0.9, top_p=1.0)


class _Events(Recorded):
    """Everything the ensemble publishes, in order."""

    def __init__(self, bus: EventBus) -> None:
        super().__init__(
            bus,
            CacheLookedUp,
            InferenceFailed,
            InferenceFinished,
            ModelLoaded,
            ModelLoadFailed,
            ModelUnloaded,
        )


class _Member(FlakyEngine):
    """A member's real engine that counts decodes, fails while ``failing`` is set or for its
    next ``fail_next`` decodes, and records what each decode was asked."""

    def __init__(self, real: LlamaEngine) -> None:
        super().__init__(real, failing=False)
        self.fail_next = 0
        self.asked: list[tuple[GenerationParams, float]] = []

    def complete(
        self,
        tokens: list[int],
        params: GenerationParams,
        on_text: OnText | None = None,
        *,
        head_start_s: float = 0.0,
    ) -> Completion:
        self.asked.append((params, head_start_s))
        if self.fail_next:
            self.fail_next -= 1
            self.calls += 1
            raise EngineError("flaky", "llama_decode returned -3")
        return super().complete(tokens, params, on_text, head_start_s=head_start_s)


class _Engines:
    """Loads the members' real engines, each behind a _Member; ``broken`` members fail to
    load at all."""

    def __init__(self) -> None:
        self.by_name: dict[str, _Member] = {}
        self.broken: set[str] = set()

    def __call__(self, spec: ModelSpec) -> Engine:
        if spec.name in self.broken:
            raise EngineError(spec.name, "cannot load")
        engine = _Member(LlamaEngine.load(spec))
        self.by_name[spec.name] = engine
        return engine


def _request(
    model: str = "ensemble",
    params: GenerationParams = GREEDY,
    prompt: str | None = "Hello",
    messages: tuple[ChatMessage, ...] = (),
    mode: ModeName = "fast",
) -> InferenceRequest:
    return InferenceRequest(model, mode, params, prompt=prompt, messages=messages)


def _members(path: Path, *, queue_size: int = 0) -> Settings:
    """Three members on the model at ``path``, each running one request and letting
    ``queue_size`` wait; the fast mode prefers c, then a."""
    return Settings.from_mapping(
        {
            "models": [
                {
                    "name": n,
                    "path": str(path),
                    "n_ctx": 256,
                    "queue_size": queue_size,
                    "parallel": 1,
                }
                for n in MEMBERS
            ],
            "modes": {"fast": {"prefer": ["c", "a"]}},
        },
        environ={},
    )


@pytest.fixture(name="ensemble_settings")
def _ensemble_settings(demo_dir: Path) -> Settings:
    """The three members on the tiny demo model, none waiting beyond the one running."""
    return _members(demo_dir / "demo-tiny.gguf")


@pytest.fixture(name="engines")
def _engines() -> _Engines:
    return _Engines()


@pytest.fixture(name="bus")
def _bus() -> EventBus:
    return EventBus()


@pytest.fixture(name="events")
def _events(bus: EventBus) -> _Events:
    return _Events(bus)


EnsembleFactory = Callable[..., Ensemble]


@pytest.fixture(name="make_ensemble")
async def _make_ensemble(
    ensemble_settings: Settings, bus: EventBus, engines: _Engines
) -> AsyncIterator[EnsembleFactory]:
    """Builds ensembles over the three members; closes them and their tasks afterwards."""
    built: list[Ensemble] = []
    runner = TaskRunner()

    def make(settings: Settings = ensemble_settings, **options: Any) -> Ensemble:
        ensemble = Ensemble(settings, bus, engines, runner, **options)
        built.append(ensemble)
        return ensemble

    try:
        yield make
    finally:
        await runner.aclose()
        for ensemble in built:
            await ensemble.close(drain_timeout_s=1.0)


@pytest.fixture(name="ensemble")
async def _ensemble(make_ensemble: EnsembleFactory) -> Ensemble:
    """The three members, loaded."""
    ensemble = make_ensemble()
    await ensemble.load_all()
    return ensemble


class TestRouting:
    async def test_a_named_member_is_the_only_candidate(self, ensemble: Ensemble) -> None:
        """A request naming a member goes to that member and no other."""
        assert [s.name for s in ensemble.candidates("b", "fast")] == ["b"]
        result = await ensemble.complete(_request("b"))
        assert result.member == "b"

    async def test_an_unknown_member_is_not_found(self, ensemble: Ensemble) -> None:
        """An unknown name is refused, naming the members there are."""
        with pytest.raises(ModelNotFoundError, match="choose one of: ensemble, a, b, c"):
            ensemble.candidates("d", "fast")

    async def test_the_mode_preference_comes_first_then_the_rest_in_config_order(
        self, ensemble: Ensemble
    ) -> None:
        """model "ensemble" tries the mode's preferred members, then the others as declared."""
        assert [s.name for s in ensemble.candidates("ensemble", "fast")] == ["c", "a", "b"]
        assert [s.name for s in ensemble.candidates("ensemble", "creative")] == ["a", "b", "c"]
        assert (await ensemble.complete(_request())).member == "c"

    async def test_unfit_members_go_last_not_away(self, make_ensemble: EnsembleFactory) -> None:
        """Members the health view finds unfit are tried after every fit one, in order."""
        ensemble = make_ensemble(can_serve=lambda name: name not in ("c", "a"))
        await ensemble.load_all()
        assert [s.name for s in ensemble.candidates("ensemble", "fast")] == ["b", "c", "a"]
        assert (await ensemble.complete(_request())).member == "b"
        named = ensemble.candidates("c", "fast")
        assert [s.name for s in named] == ["c"]  # asked for by name: still served

    async def test_a_full_member_passes_the_request_to_the_next(
        self, ensemble: Ensemble, events: _Events
    ) -> None:
        """A member whose queue is full is skipped; the failed attempt is not the request's
        end, the answer is."""
        held = ensemble.slots["c"].acquire()
        try:
            result = await ensemble.complete(_request())
        finally:
            held.release()
        assert result.member == "a"
        failed = events.of(InferenceFailed)
        assert [(f.model, f.error_type, f.final) for f in failed] == [("c", "overloaded", False)]
        assert [f.model for f in events.of(InferenceFinished)] == ["a"]

    async def test_a_failing_member_passes_the_request_to_the_next(
        self, ensemble: Ensemble, engines: _Engines, events: _Events
    ) -> None:
        """An engine failure on the preferred member: the next one answers."""
        engines.by_name["c"].failing = True
        result = await ensemble.complete(_request())
        assert result.member == "a"
        assert engines.by_name["c"].calls == 1
        failed = events.of(InferenceFailed)
        assert [(f.model, f.error_type, f.final) for f in failed] == [("c", "engine_error", False)]

    async def test_a_named_member_does_not_fall_back(
        self, ensemble: Ensemble, engines: _Engines, events: _Events
    ) -> None:
        """A request naming a member fails with that member's error, as the final outcome."""
        engines.by_name["b"].failing = True
        with pytest.raises(EngineError, match="llama_decode returned -3"):
            await ensemble.complete(_request("b"))
        held = ensemble.slots["a"].acquire()
        try:
            with pytest.raises(OverloadedError):
                await ensemble.complete(_request("a"))
        finally:
            held.release()
        assert [(f.model, f.error_type, f.final) for f in events.of(InferenceFailed)] == [
            ("b", "engine_error", True),
            ("a", "overloaded", True),
        ]
        assert engines.by_name["a"].calls == engines.by_name["c"].calls == 0

    async def test_when_no_member_can_serve_each_says_why(
        self, ensemble: Ensemble, engines: _Engines, events: _Events
    ) -> None:
        """Every member full or failing: one final failure of the ensemble, naming each
        member's reason."""
        engines.by_name["a"].failing = True
        held = [ensemble.slots["c"].acquire()]
        ensemble.slots["b"].unload("reloading")
        try:
            with pytest.raises(NoMemberAvailableError) as refused:
                await ensemble.complete(_request())
        finally:
            for lease in held:
                lease.release()
        assert refused.value.reasons == {
            "c": "overloaded",
            "a": "Inference failed on model 'flaky': llama_decode returned -3",
            "b": "the model is being reloaded (its old copy was unloaded first)",
        }
        finals = [(f.model, f.error_type) for f in events.of(InferenceFailed) if f.final]
        assert finals == [("ensemble", "no_member_available")]

    async def test_a_prompt_that_does_not_fit_is_refused_before_decoding(
        self, ensemble: Ensemble, engines: _Engines
    ) -> None:
        """Prompt plus max_tokens over n_ctx is the client's error, not a fallback; exactly
        n_ctx fits."""
        n_ctx = engines.by_name["b"].info.n_ctx
        room = n_ctx - len(engines.by_name["b"].tokenize("Hello"))
        fits = GenerationParams(max_tokens=room, temperature=0.0, top_p=1.0)
        result = await ensemble.complete(_request("b", fits))
        assert result.completion.completion_tokens == room
        over = GenerationParams(max_tokens=room + 1, temperature=0.0, top_p=1.0)
        with pytest.raises(ContextLengthExceededError):
            await ensemble.complete(_request(params=over))
        assert engines.by_name["c"].calls == 0

    async def test_chat_messages_use_the_template_and_its_stop_strings(
        self, make_ensemble: EnsembleFactory, engines: _Engines, tmp_path: Path
    ) -> None:
        """A chat request is rendered for the member and stops at the end of its turn as well
        as at the request's own stop strings, each once."""
        model = DemoModel("untemplated", 64, 2, 192, 4, seed=1, chat_template="")
        ensemble = make_ensemble(_members(write_model(model, tmp_path / model.filename)))
        await ensemble.load_all()
        member = engines.by_name["a"]
        chat = (ChatMessage("user", "Hello"),)
        prompt = member.render_chat(chat)
        assert prompt.stop == ("\nuser:", "\nsystem:")  # turn markers of the transcript
        own = GenerationParams(4, 0.0, 1.0, stop=("!", "\nuser:"))
        result = await ensemble.complete(_request("a", own, prompt=None, messages=chat))
        asked, _ = member.asked[-1]
        assert asked.stop == ("!", "\nuser:", "\nsystem:")
        assert (asked.max_tokens, asked.temperature, asked.top_p) == (4, 0.0, 1.0)
        assert result.completion.prompt_tokens == len(prompt.tokens)
        assert result.completion.text == member.real.complete(prompt.tokens, asked).text

    async def test_a_completion_sends_the_prompt_unchanged(
        self, ensemble: Ensemble, engines: _Engines
    ) -> None:
        """A plain prompt is tokenized as it is, with the request's parameters."""
        params = GenerationParams(4, 0.0, 1.0, stop=("x",))
        result = await ensemble.complete(_request("a", params, prompt="Hello there"))
        assert engines.by_name["a"].asked == [(params, 2.0)]
        assert result.completion.prompt_tokens == len(engines.by_name["a"].tokenize("Hello there"))

    @pytest.mark.parametrize(
        ("mode", "head_start_s"), [("fast", 2.0), ("balanced", 1.0), ("creative", 0.0)]
    )
    async def test_each_mode_gets_its_place_in_the_admission_order(
        self, ensemble: Ensemble, engines: _Engines, mode: ModeName, head_start_s: float
    ) -> None:
        """A fast request is admitted up to 2 s ahead of its arrival, balanced 1 s, creative
        not at all: fast overtakes the others, and nothing waits more than 2 s behind."""
        await ensemble.complete(_request("b", SAMPLED, mode=mode))
        stream = ensemble.start_stream(_request("b", SAMPLED, mode=mode))
        await stream.first()
        assert "".join([piece async for piece in stream.pieces()])
        assert [head for _, head in engines.by_name["b"].asked] == [head_start_s] * 2


class TestSingleFlight:
    async def test_identical_requests_in_flight_share_one_generation(
        self, ensemble: Ensemble, engines: _Engines, events: _Events
    ) -> None:
        """A deterministic request identical to one still running waits for its answer
        instead of generating again, and counts as a cache hit."""
        results = []

        async def ask() -> None:
            results.append(await ensemble.complete(_request("a")))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ask)
            tasks.start_soon(ask)
        assert engines.by_name["a"].calls == 1
        assert [r.cached for r in results] == [False, True]
        assert results[0].completion == results[1].completion
        assert [e.hit for e in events.of(CacheLookedUp)] == [False, True]
        assert [f.cached for f in events.of(InferenceFinished)] == [False, True]

    async def test_requests_that_differ_do_not_wait_for_each_other(
        self, make_ensemble: EnsembleFactory, engines: _Engines, demo_dir: Path
    ) -> None:
        """Other parameters, another prompt or a sampled request: each generates; the same
        request to another member on the same weights shares the generation."""
        ensemble = make_ensemble(_members(demo_dir / "demo-tiny.gguf", queue_size=3))
        await ensemble.load_all()
        longer = GenerationParams(max_tokens=5, temperature=0.0, top_p=1.0)
        requests = [
            _request("a"),
            _request("a", longer),
            _request("a", prompt="Hi"),
            _request("a", SAMPLED),
            _request("b"),
        ]
        results: dict[InferenceRequest, InferenceResult] = {}

        async def ask(request: InferenceRequest) -> None:
            results[request] = await ensemble.complete(request)

        async with anyio.create_task_group() as tasks:
            for request in requests:
                tasks.start_soon(ask, request)
        assert [results[r].cached for r in requests] == [False, False, False, False, True]
        assert (engines.by_name["a"].calls, engines.by_name["b"].calls) == (4, 0)

    async def test_when_the_first_fails_the_one_waiting_generates_itself(
        self, ensemble: Ensemble, engines: _Engines
    ) -> None:
        """A waiting request whose leader failed is not failed with it: it runs on its own."""
        engines.by_name["a"].fail_next = 1
        outcomes: list[object] = []

        async def ask() -> None:
            try:
                outcomes.append(await ensemble.complete(_request("a")))
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
        assert (await ensemble.complete(_request("a"))).cached  # the success was cached

    async def test_when_the_first_is_cancelled_the_one_waiting_does_not_hang(
        self, ensemble: Ensemble, engines: _Engines
    ) -> None:
        """A leader whose client went away still releases those waiting for it."""
        results: list[InferenceResult] = []

        async def leader(scope: anyio.CancelScope) -> None:
            with scope:
                await ensemble.complete(_request("a"))

        async def follower() -> None:
            results.append(await ensemble.complete(_request("a")))

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
        self, ensemble: Ensemble, engines: _Engines, events: _Events
    ) -> None:
        """A deterministic stream identical to a request in flight gets that answer's text,
        counted as a cached streamed answer, without a second generation."""
        results: list[InferenceResult] = []

        async def ask() -> None:
            results.append(await ensemble.complete(_request("a")))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ask)
            await anyio.lowlevel.checkpoint()
            stream = ensemble.start_stream(_request("a"))
            await stream.first()
            text = "".join([piece async for piece in stream.pieces()])
        assert engines.by_name["a"].calls == 1
        assert stream.member == "a"
        assert text == results[0].completion.text
        assert stream.result == results[0].completion
        finished = [(f.stream, f.cached) for f in events.of(InferenceFinished)]
        assert sorted(finished) == [(False, False), (True, True)]

    async def test_a_stream_joined_to_a_failed_request_fails_too(
        self, ensemble: Ensemble, engines: _Engines, events: _Events
    ) -> None:
        """When the request a stream joined fails, the stream fails before any text."""
        engines.by_name["a"].failing = True

        async def ask() -> None:
            with pytest.raises(EngineError):
                await ensemble.complete(_request("a"))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ask)
            await anyio.lowlevel.checkpoint()
            stream = ensemble.start_stream(_request("a"))
            with pytest.raises(EngineError, match="the identical request this one joined failed"):
                await stream.first()
            stream.close()
        assert engines.by_name["a"].calls == 1
        assert [(f.model, f.final) for f in events.of(InferenceFailed)] == [
            ("a", True),
            ("a", True),
        ]

    async def test_a_request_joins_an_identical_stream_in_flight(
        self, ensemble: Ensemble, engines: _Engines
    ) -> None:
        """A deterministic stream leads too: an identical request arriving while it
        generates gets the stream's whole answer."""
        long = GenerationParams(max_tokens=240, temperature=0.0, top_p=1.0)
        stream = ensemble.start_stream(_request("a", long))
        await stream.first()
        joined = await ensemble.complete(_request("a", long))
        text = "".join([piece async for piece in stream.pieces()])
        assert joined.cached
        assert joined.completion == stream.result
        assert joined.completion.text == text
        assert engines.by_name["a"].calls == 1


class TestCache:
    async def test_a_repeated_deterministic_request_is_answered_from_the_cache(
        self, ensemble: Ensemble, engines: _Engines, events: _Events
    ) -> None:
        """The second identical temperature-0 request never reaches the engine."""
        first = await ensemble.complete(_request())
        second = await ensemble.complete(_request())
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
        self, ensemble: Ensemble, engines: _Engines, events: _Events
    ) -> None:
        """Without temperature 0 or a seed, each request runs; a seed makes it cacheable."""
        for _ in range(2):
            assert not (await ensemble.complete(_request(params=SAMPLED))).cached
        assert engines.by_name["c"].calls == 2
        assert events.of(CacheLookedUp) == []
        seeded = GenerationParams(max_tokens=4, temperature=0.9, top_p=1.0, seed=7)
        results = [await ensemble.complete(_request(params=seeded)) for _ in range(2)]
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
        await ensemble.complete(_request("a"))
        assert (await ensemble.complete(_request("b"))).cached
        assert not (await ensemble.complete(_request("wider"))).cached
        assert not (await ensemble.complete(_request("other"))).cached
        longer = GenerationParams(max_tokens=5, temperature=0.0, top_p=1.0)
        assert not (await ensemble.complete(_request("a", longer))).cached
        assert not (await ensemble.complete(_request("a", prompt="Hello!"))).cached
        assert (await ensemble.complete(_request("a"))).cached

    async def test_a_new_copy_answers_from_the_cache_only_with_the_same_weights(
        self, ensemble: Ensemble, demo_dir: Path, tmp_path: Path
    ) -> None:
        """A swap to a copy of the same bytes keeps the cached answers (same identity); a
        swap to other weights under the same name and path never serves the old text."""
        await ensemble.complete(_request("a"))
        slot = ensemble.slots["a"]
        old = slot.active
        assert old is not None
        same = slot.install(
            LlamaEngine.load(slot.spec),
            await anyio.to_thread.run_sync(ensemble.identify, slot.spec),
        )
        await old.close()
        assert (await ensemble.complete(_request("a"))).cached
        other_spec = ModelSpec(name="a", path=demo_dir / "demo-small.gguf", n_ctx=256)
        other = slot.install(
            LlamaEngine.load(other_spec),
            await anyio.to_thread.run_sync(ensemble.identify, other_spec),
        )
        await same.close()
        try:
            assert not (await ensemble.complete(_request("a"))).cached
            assert (await ensemble.complete(_request("a"))).cached
        finally:
            assert other is slot.active

    async def test_a_failed_request_is_not_cached(
        self, ensemble: Ensemble, engines: _Engines
    ) -> None:
        """A request that failed runs again next time."""
        engines.by_name["b"].failing = True
        with pytest.raises(EngineError):
            await ensemble.complete(_request("b"))
        engines.by_name["b"].failing = False
        assert not (await ensemble.complete(_request("b"))).cached

    async def test_a_disabled_cache_caches_nothing(
        self, make_ensemble: EnsembleFactory, ensemble_settings: Settings, engines: _Engines
    ) -> None:
        """cache.enabled = false: every request reaches the engine."""
        settings = ensemble_settings.model_copy(
            update={"cache": ensemble_settings.cache.model_copy(update={"enabled": False})}
        )
        ensemble = make_ensemble(settings)
        await ensemble.load_all()
        for _ in range(2):
            assert not (await ensemble.complete(_request("a"))).cached
        assert engines.by_name["a"].calls == 2


class TestStreams:
    async def test_a_stream_starts_on_the_first_member_that_can_take_it(
        self, ensemble: Ensemble, events: _Events
    ) -> None:
        """A stream skips a full member, yields the text, and frees the member at the end."""
        held = ensemble.slots["c"].acquire()
        try:
            stream = ensemble.start_stream(_request(params=SAMPLED))
            await stream.first()
            text = "".join([piece async for piece in stream.pieces()])
        finally:
            held.release()
        assert stream.member == "a"
        assert stream.result is not None
        assert text == stream.result.text
        loaded = ensemble.slots["a"].active
        assert loaded is not None
        assert loaded.in_flight == 0
        finished = events.of(InferenceFinished)
        assert [(f.model, f.stream, f.outcome) for f in finished] == [("a", True, "success")]
        assert finished[0].time_to_first_token_s is not None

    async def test_a_stream_no_member_can_take_fails_before_it_starts(
        self, ensemble: Ensemble, events: _Events
    ) -> None:
        """With every member full, starting a stream raises (so the client gets a 503)."""
        held = [ensemble.slots[name].acquire() for name in MEMBERS]
        try:
            with pytest.raises(NoMemberAvailableError):
                ensemble.start_stream(_request())
            with pytest.raises(OverloadedError):
                ensemble.start_stream(_request("b"))
        finally:
            for lease in held:
                lease.release()
        assert [f.final for f in events.of(InferenceFailed)] == [True, True]

    async def test_a_stream_the_client_leaves_stops_and_frees_the_member(
        self, ensemble: Ensemble, events: _Events
    ) -> None:
        """Closing the stream stops generation; the member is free again and the outcome
        is cancelled."""
        long = GenerationParams(max_tokens=100, temperature=0.9, top_p=1.0)
        stream = ensemble.start_stream(_request("b", long))
        await stream.first()
        stream.close()
        loaded = ensemble.slots["b"].active
        assert loaded is not None
        with anyio.fail_after(10):
            while loaded.in_flight:
                await anyio.sleep(0.01)
        finished = events.of(InferenceFinished)
        assert [(f.model, f.outcome) for f in finished] == [("b", "cancelled")]
        assert finished[0].completion_tokens < 100

    async def test_a_stream_that_fails_before_any_text_raises_its_error(
        self, ensemble: Ensemble, engines: _Engines
    ) -> None:
        """An engine failure before the first piece is raised by first()."""
        engines.by_name["b"].failing = True
        stream = ensemble.start_stream(_request("b"))
        with pytest.raises(EngineError):
            await stream.first()
        stream.close()
        loaded = ensemble.slots["b"].active
        assert loaded is not None
        with anyio.fail_after(10):
            while loaded.in_flight:
                await anyio.sleep(0.01)


class TestLifecycle:
    async def test_a_member_that_fails_to_load_is_marked_and_the_others_load(
        self, make_ensemble: EnsembleFactory, engines: _Engines, events: _Events
    ) -> None:
        """A load failure marks that member failed with the error; loading goes on."""
        engines.broken.add("b")
        ensemble = make_ensemble()
        await ensemble.load_all()
        assert ensemble.loading_done.is_set()
        assert {n: s.state for n, s in ensemble.slots.items()} == {
            "a": "ready",
            "b": "failed",
            "c": "ready",
        }
        assert [(e.model, e.error) for e in events.of(ModelLoadFailed)] == [
            ("b", "Inference failed on model 'b': cannot load")
        ]
        assert [e.model for e in events.of(ModelLoaded)] == ["a", "c"]
        assert [i.name for i in ensemble.instances()] == ["a", "c"]
        assert (await ensemble.complete(_request())).member == "c"

    async def test_closing_frees_every_copy_and_refuses_requests(
        self, ensemble: Ensemble, engines: _Engines, events: _Events
    ) -> None:
        """close() unloads and closes every member's copy and announces each."""
        generations = {n: s.active.generation for n, s in ensemble.slots.items() if s.active}
        await ensemble.close(drain_timeout_s=1.0)
        assert all(engine.closed for engine in engines.by_name.values())
        assert {e.model: e.generation for e in events.of(ModelUnloaded)} == generations
        assert {s.state for s in ensemble.slots.values()} == {"stopped"}
        assert ensemble.instances() == []
        with pytest.raises(ModelUnavailableError, match="not loaded"):
            await ensemble.complete(_request("a"))

    async def test_closing_waits_for_a_request_in_flight(
        self, ensemble: Ensemble, engines: _Engines
    ) -> None:
        """A request still running when shutdown starts finishes before its copy closes."""
        held = ensemble.slots["a"].acquire()
        closing: list[bool] = []

        async def release_later() -> None:
            await anyio.sleep(0.1)
            closing.append(engines.by_name["a"].closed)
            held.release()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(release_later)
            await ensemble.close(drain_timeout_s=5.0)
        assert closing == [False]
        assert engines.by_name["a"].closed

    async def test_a_member_loaded_after_shutdown_began_is_closed(
        self, make_ensemble: EnsembleFactory, engines: _Engines
    ) -> None:
        """A load that ends after close() started frees its engine instead of serving."""
        ensemble = make_ensemble()
        await ensemble.close(drain_timeout_s=1.0)
        await ensemble.load(ensemble.slots["a"])
        assert engines.by_name["a"].closed
        assert ensemble.slots["a"].active is None
