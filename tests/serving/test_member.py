"""What reaches a member's engine: checked before the scheduler admits it, so no request's
own bad input can fail its neighbours' step or count against the member's health."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from ensemble_ops.config import ModelSpec, Settings
from ensemble_ops.errors import ContextLengthExceededError, InvalidRequestError
from ensemble_ops.http.app import create_app
from ensemble_ops.serving.engine import (
    Completion,
    EngineFailure,
    GenerationParams,
    SequenceHandle,
    SequenceSink,
)
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.serving.real_models import SMOLLM2_135M
from ensemble_ops.serving.scheduler import SequenceSpec

from ..conftest import EngineWrapper, serving

GREEDY = GenerationParams(max_tokens=6, temperature=0.0, top_p=1.0)
INSTRUCT = SMOLLM2_135M.name


@pytest.fixture(name="engine")
def _engine(demo_dir: Path) -> Iterator[LlamaEngine]:
    engine = LlamaEngine.load(
        ModelSpec(name="tiny", path=demo_dir / "demo-tiny.gguf", n_ctx=64, parallel=4)
    )
    try:
        yield engine
    finally:
        engine.close()


class _Ends:
    """A sink that keeps how its sequence ended."""

    def __init__(self) -> None:
        self.outcome: Completion | EngineFailure | None = None
        self.done = threading.Event()

    def piece(self, text: str) -> None:
        pass

    def end(self, outcome: Completion | EngineFailure) -> None:
        self.outcome = outcome
        self.done.set()


class TestTheEngineChecksWhatItAdmits:
    def test_an_empty_prompt_starts_from_bos(self, engine: LlamaEngine) -> None:
        """An empty prompt is the BOS token alone, and is answered."""
        tokens = engine.tokenize("")
        assert len(tokens) == 1
        assert engine.complete(tokens, GREEDY).prompt_tokens == 1

    def test_no_token_at_all_is_refused(self, engine: LlamaEngine) -> None:
        """A sequence without a token is the request's error (a 400 naming prompt)."""
        with pytest.raises(InvalidRequestError, match="prompt is empty") as refused:
            engine.complete([], GREEDY)
        assert refused.value.param == "prompt"

    @pytest.mark.parametrize("token", [-1, 10**6])
    def test_a_token_outside_the_vocabulary_is_refused(
        self, engine: LlamaEngine, token: int
    ) -> None:
        """Token ids llama.cpp would refuse (or crash on) never reach the scheduler."""
        with pytest.raises(InvalidRequestError, match=f"Token {token} is outside"):
            engine.complete([1, token], GREEDY)
        assert engine.free_slots == 4

    def test_more_than_the_context_holds_is_refused(self, engine: LlamaEngine) -> None:
        """Prompt plus max_tokens over n_ctx is refused before decoding; exactly n_ctx fits."""
        tokens = engine.tokenize("Hello")
        room = 64 - len(tokens)
        fits = GenerationParams(max_tokens=room, temperature=0.0, top_p=1.0)
        assert engine.complete(tokens, fits).completion_tokens == room
        over = GenerationParams(max_tokens=room + 1, temperature=0.0, top_p=1.0)
        with pytest.raises(ContextLengthExceededError):
            engine.complete(tokens, over)

    def test_an_empty_stop_string_is_ignored(self, engine: LlamaEngine) -> None:
        """A stop string of nothing would match before any output: it is dropped."""
        empty_stop = GenerationParams(max_tokens=6, temperature=0.0, top_p=1.0, stop=("",))
        answer = engine.complete(engine.tokenize("Hello"), empty_stop)
        assert answer.completion_tokens == 6
        assert answer.text == engine.complete(engine.tokenize("Hello"), GREEDY).text


class TestAStepThatFails:
    def test_only_the_sequence_that_fails_a_step_is_failed(self, engine: LlamaEngine) -> None:
        """Past the engine's checks (the scheduler's own net): a token llama.cpp refuses,
        sharing its first step with three good sequences, fails that sequence alone; the
        three get every token they asked for."""
        sinks = [_Ends() for _ in range(4)]
        good = engine.tokenize("Hello")
        specs = [
            SequenceSpec(tokens, 5, 0.0, 1.0, None, ())
            for tokens in (good, good, [*good[:-1], 10**6], good)
        ]
        scheduler = engine._scheduler  # the check in front is bypassed on purpose
        scheduler.submit_many(list(zip(specs, sinks, strict=True)))
        for sink in sinks:
            assert sink.done.wait(30)
        outcomes = [sink.outcome for sink in sinks]
        assert isinstance(outcomes[2], EngineFailure)
        assert "llama_decode returned" in outcomes[2].message
        for i in (0, 1, 3):
            finished = outcomes[i]
            assert isinstance(finished, Completion)
            assert finished.completion_tokens == 5
        assert engine.free_slots == 4


class _Together(EngineWrapper):
    """A real engine whose sequences are held until ``size`` have arrived, then queued at
    once: they share their first step by construction (a real server makes no promise of
    which requests share a step)."""

    def __init__(self, real: LlamaEngine, size: int) -> None:
        super().__init__(real)
        self.size = size
        self.rounds: list[int] = []
        """Prompt tokens of each round's four sequences together."""
        self._held: list[tuple[list[int], GenerationParams, SequenceSink]] = []
        self._lock = threading.Lock()

    def submit(
        self,
        tokens: list[int],
        params: GenerationParams,
        sink: SequenceSink,
        **options: Any,
    ) -> SequenceHandle:
        with self._lock:
            self._held.append((tokens, params, sink))
            if len(self._held) < self.size:
                return _NotYet()
            held, self._held = self._held, []
        self.rounds.append(sum(len(tokens) for tokens, _, _ in held))
        self.real.submit_many(held, **options)
        return _NotYet()


class _NotYet:
    def cancel(self) -> None:
        pass


@pytest.mark.real_models
class TestPoison:
    async def test_an_empty_prompt_on_a_real_member_harms_no_neighbour(
        self, real_paths: dict[str, Path]
    ) -> None:
        """Ten times, three normal requests share a step with an empty prompt on the real
        instruct member: all four are answered, and the member stays healthy."""
        settings = Settings.from_mapping(
            {"models": [{"name": INSTRUCT, "path": str(real_paths[INSTRUCT]), "parallel": 4}]},
            environ={},
        )
        engines: list[_Together] = []

        def load(spec: ModelSpec) -> _Together:
            engines.append(_Together(LlamaEngine.load(spec), size=4))
            return engines[-1]

        app = create_app(settings, loader=load)
        prompts = ["", "The sky is", "Water boils at", "One, two,"]
        async with serving(app) as client:
            for _ in range(10):
                answers = await _together(client, prompts)
                assert [a.status_code for a in answers] == [200] * 4, answers[0].text
                assert answers[0].json()["usage"]["prompt_tokens"] == 1  # BOS
            health = (await client.get("/health/llm", params={"model": INSTRUCT})).json()
        assert health["status"] == "healthy", health
        steps = engines[0].real.drain_batch_sizes()
        assert all(size in steps for size in engines[0].rounds)  # each round, one first step


async def _together(client: httpx.AsyncClient, prompts: list[str]) -> list[httpx.Response]:
    answers: list[httpx.Response] = [httpx.Response(0)] * len(prompts)

    async def ask(i: int) -> None:
        body = {"model": INSTRUCT, "prompt": prompts[i], "max_tokens": 8, "temperature": 0.7}
        answers[i] = await client.post("/v1/completions", json=body)

    async with anyio.create_task_group() as tasks:
        for i in range(len(prompts)):
            tasks.start_soon(ask, i)
    return answers
