"""Prompt prefix reuse: a new sequence reuses the KV cells of the longest prefix its member
still holds, from a finished sequence or a running one, within the cache's budget."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ensemble_ops.config import ModelSpec
from ensemble_ops.serving.engine import (
    Completion,
    EngineFailure,
    GenerationParams,
)
from ensemble_ops.serving.llama_engine import LlamaEngine

GREEDY = GenerationParams(max_tokens=8, temperature=0.0, top_p=1.0)
PREAMBLE = "You answer questions about the weather in one short sentence. " * 4


def _engine(demo_dir: Path, *, parallel: int, n_ctx: int = 512) -> LlamaEngine:
    return LlamaEngine.load(
        ModelSpec(name="tiny", path=demo_dir / "demo-small.gguf", n_ctx=n_ctx, parallel=parallel)
    )


@pytest.fixture(name="engine")
def _one_slot(demo_dir: Path) -> Iterator[LlamaEngine]:
    engine = _engine(demo_dir, parallel=1)
    try:
        yield engine
    finally:
        engine.close()


class _FirstPiece:
    """A sink that says when its sequence's first piece came (its prompt is in the cache)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()
        self.outcome: Completion | EngineFailure | None = None

    def piece(self, text: str) -> None:
        self.started.set()

    def end(self, outcome: Completion | EngineFailure) -> None:
        self.outcome = outcome
        self.started.set()
        self.ended.set()


class TestReuse:
    def test_a_repeated_prefix_is_not_prefilled_again(self, engine: LlamaEngine) -> None:
        """The second prompt shares the first one's preamble: its cells are reused (reported
        as cached tokens) and the step that starts it decodes only the rest."""
        first = engine.tokenize(PREAMBLE + "Is it raining in Paris?")
        second = engine.tokenize(PREAMBLE + "Is it sunny in Rome?")
        shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
        cold = engine.complete(first, GREEDY)
        engine.drain_batch_sizes()
        warm = engine.complete(second, GREEDY)
        prefill = engine.drain_batch_sizes()[0]
        assert cold.cached_tokens == 0
        assert warm.cached_tokens == shared
        assert prefill == len(second) - shared

    def test_an_identical_prompt_still_decodes_its_last_token(self, engine: LlamaEngine) -> None:
        """The same prompt twice: all but its last token reused (the first sample needs the
        last token's logits), and the same greedy answer."""
        tokens = engine.tokenize(PREAMBLE)
        cold = engine.complete(tokens, GREEDY)
        warm = engine.complete(tokens, GREEDY)
        assert warm.cached_tokens == len(tokens) - 1
        assert warm.text == cold.text

    def test_a_warm_answer_equals_a_cold_one_at_temperature_zero(self, demo_dir: Path) -> None:
        """For one sequence alone, reusing cells changes nothing of the greedy answer: the
        same prompt answered after a different one sharing its preamble, and on a fresh
        engine."""
        prompt = PREAMBLE + "Will it snow in Oslo tomorrow?"
        answers = []
        for warm_up in (None, PREAMBLE + "Is it windy in Dublin?"):
            engine = _engine(demo_dir, parallel=1)
            try:
                if warm_up is not None:
                    engine.complete(engine.tokenize(warm_up), GREEDY)
                answer = engine.complete(engine.tokenize(prompt), GREEDY)
            finally:
                engine.close()
            answers.append(answer)
        cold, warm = answers
        assert (cold.cached_tokens, warm.cached_tokens > 0) == (0, True)
        assert warm.text == cold.text
        assert warm.completion_tokens == cold.completion_tokens

    def test_a_running_sequences_prefix_is_shared(self, demo_dir: Path) -> None:
        """A prompt that starts like one still generating reuses its cells from the other
        slot (shared, not copied), while the first goes on."""
        engine = _engine(demo_dir, parallel=2)
        try:
            preamble = len(engine.tokenize(PREAMBLE))
            running = _FirstPiece()
            long = GenerationParams(max_tokens=200, temperature=0.0, top_p=1.0)
            engine.submit(engine.tokenize(PREAMBLE + "Describe the sky."), long, running)
            assert running.started.wait(30)  # its prompt has its cells now
            joined = engine.complete(engine.tokenize(PREAMBLE + "Describe the sea."), GREEDY)
            assert running.ended.wait(60)
        finally:
            engine.close()
        assert joined.cached_tokens >= preamble - 2
        assert isinstance(running.outcome, Completion)
        assert running.outcome.completion_tokens > 0


class TestBudget:
    def test_the_least_recently_used_prefix_makes_room(self, demo_dir: Path) -> None:
        """Two slots keep the prompts of A and B; C shares nothing and takes the slot used
        longest ago (A's): A again finds nothing, B still finds its prefix."""
        engine = _engine(demo_dir, parallel=2)
        prompts = {
            name: engine.tokenize(f"{name} {PREAMBLE}") for name in ("Apples", "Bread", "Cheese")
        }
        try:
            for name in ("Apples", "Bread", "Cheese"):
                engine.complete(prompts[name], GREEDY)
            again = {name: engine.complete(prompts[name], GREEDY) for name in ("Bread", "Apples")}
        finally:
            engine.close()
        assert again["Bread"].cached_tokens == len(prompts["Bread"]) - 1
        assert again["Apples"].cached_tokens == 0

    def test_full_contexts_in_every_slot_never_run_out_of_cells(self, demo_dir: Path) -> None:
        """Slots kept full of retained prefixes, then every slot asked for a whole context
        at once: every sequence gets all its tokens (the retained cells give way)."""
        engine = _engine(demo_dir, parallel=2, n_ctx=64)
        try:
            for i in range(4):
                engine.complete(engine.tokenize(f"Warm {i} {PREAMBLE}")[:48], GREEDY)
            assert engine.kv_retained > 0
            sinks = [_FirstPiece() for _ in range(2)]
            for i, sink in enumerate(sinks):
                tokens = engine.tokenize(f"Fill {i} {PREAMBLE}")[:24]
                params = GenerationParams(64 - len(tokens), 0.0, 1.0)
                engine.submit(tokens, params, sink)
            for sink in sinks:
                assert sink.ended.wait(60)
            assert engine.kv_usage == 0.0
        finally:
            engine.close()
        outcomes = [sink.outcome for sink in sinks]
        assert all(isinstance(o, Completion) and o.finish_reason == "length" for o in outcomes)
