"""Warm-up: a new copy must answer each of N prompts, in time, before it takes traffic."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from ensemble_ops.config import ModelSpec
from ensemble_ops.reload.warmup import WarmupFailedError, chat_warmup, warm_once
from ensemble_ops.serving.demo import DemoModel, write_model
from ensemble_ops.serving.engine import (
    PLAIN_TRANSCRIPT_STOP,
    ChatMessage,
    Completion,
    Engine,
    GenerationParams,
    SequenceHandle,
    SequenceSink,
)
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.serving.slot import Loaded
from ensemble_ops.tasks import TaskRunner

from ..conftest import EngineWrapper


@pytest.fixture(name="loaded")
def _loaded(demo_dir: Path) -> Loaded:
    spec = ModelSpec(name="demo-tiny", path=demo_dir / "demo-tiny.gguf", n_ctx=256)
    return Loaded(spec.name, LlamaEngine.load(spec))


@pytest.fixture(name="runner")
async def _runner(loaded: Loaded) -> AsyncIterator[TaskRunner]:
    runner = TaskRunner()
    try:
        yield runner
    finally:
        await runner.aclose()
        await loaded.close()


class TestWarmOnce:
    @pytest.mark.parametrize(
        "answer",
        [Completion("hi", "length", 3, 1), Completion("", "length", 3, 1), "ok", True, 1],
    )
    async def test_an_answer_passes(
        self, loaded: Loaded, runner: TaskRunner, answer: object
    ) -> None:
        """A completion with tokens (even ones that print as nothing) or any non-empty value
        passes."""
        await warm_once(loaded, lambda engine: answer, 1, 5.0, runner)

    @pytest.mark.parametrize("answer", [Completion("", "stop", 3, 0), "", None, False, 0, []])
    async def test_nothing_fails(self, loaded: Loaded, runner: TaskRunner, answer: object) -> None:
        """No tokens and no text, or an empty value, fails the iteration and says which."""
        with pytest.raises(WarmupFailedError) as failed:
            await warm_once(loaded, lambda engine: answer, 2, 5.0, runner)
        assert str(failed.value) == "warm-up iteration 2 returned nothing"

    async def test_an_error_fails_with_its_message(
        self, loaded: Loaded, runner: TaskRunner
    ) -> None:
        """An exception in the warm-up fails the iteration, carrying the exception's text."""

        def broken(engine: Engine) -> object:
            raise RuntimeError("decode returned -3")

        with pytest.raises(WarmupFailedError) as failed:
            await warm_once(loaded, broken, 3, 5.0, runner)
        assert str(failed.value) == "warm-up iteration 3 failed: decode returned -3"

    async def test_a_hung_warmup_times_out_and_the_copy_waits_for_it(
        self, loaded: Loaded, runner: TaskRunner
    ) -> None:
        """A warm-up slower than the timeout fails at the timeout; the inference itself is
        left to finish, holding the copy until it does."""
        release = threading.Event()

        def hang(engine: Engine) -> object:
            release.wait(10)
            return "late"

        started = time.monotonic()
        with pytest.raises(WarmupFailedError) as failed:
            await warm_once(loaded, hang, 1, 0.1, runner)
        assert time.monotonic() - started < 5
        assert str(failed.value) == "warm-up iteration 1 timed out after 0.1 s"
        assert loaded.running_since is not None  # still running in its thread
        release.set()
        with anyio.fail_after(10):
            while loaded.running_since is not None:
                await anyio.sleep(0.01)

    async def test_the_warmup_runs_on_the_new_copy(
        self, loaded: Loaded, runner: TaskRunner
    ) -> None:
        """The function is given the copy's own engine."""
        seen: list[Engine] = []

        def remember(engine: Engine) -> bool:
            seen.append(engine)
            return True

        await warm_once(loaded, remember, 1, 5.0, runner)
        assert seen == [loaded.engine]


class TestChatWarmup:
    def test_the_default_warmup_chats_at_temperature_zero(self, loaded: Loaded) -> None:
        """The prompt goes through the chat template as a user message; the answer is
        greedy (the same every time) and at most max_tokens long."""
        warm = chat_warmup("Hello there", 6)
        answers = [warm(loaded.engine) for _ in range(3)]
        assert all(isinstance(a, Completion) for a in answers)
        texts = {(a.text, a.completion_tokens) for a in answers if isinstance(a, Completion)}
        assert len(texts) == 1
        first = answers[0]
        assert isinstance(first, Completion)
        assert 0 < first.completion_tokens <= 6
        chat = loaded.engine.render_chat([ChatMessage("user", "Hello there")])
        assert first.prompt_tokens == len(chat.tokens)

    def test_the_default_warmup_stops_at_the_end_of_the_turn(self, tmp_path: Path) -> None:
        """Greedy, max_tokens long at most, and stopped by the template's turn markers, so a
        copy is judged on the answer a user would get."""
        model = DemoModel("untemplated", 64, 2, 192, 4, seed=1, chat_template="")
        spec = ModelSpec(name="plain", path=write_model(model, tmp_path / model.filename))
        engine = _Asked(LlamaEngine.load(spec))
        try:
            chat_warmup("Hello there", 6)(engine)
        finally:
            engine.close()
        assert engine.asked == [
            GenerationParams(max_tokens=6, temperature=0.0, top_p=1.0, stop=PLAIN_TRANSCRIPT_STOP)
        ]


class _Asked(EngineWrapper):
    """A real engine that records the parameters of each sequence."""

    def __init__(self, real: LlamaEngine) -> None:
        super().__init__(real)
        self.asked: list[GenerationParams] = []

    def submit(
        self,
        tokens: list[int],
        params: GenerationParams,
        sink: SequenceSink,
        **options: Any,
    ) -> SequenceHandle:
        self.asked.append(params)
        return super().submit(tokens, params, sink, **options)
