"""The continuous-batching scheduler, through LlamaEngine on a generated model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ensemble_ops.config import ModelSpec
from ensemble_ops.serving.engine import GenerationParams
from ensemble_ops.serving.llama_engine import LlamaEngine


def _engine(demo_dir: Path, parallel: int, model: str = "demo-tiny") -> LlamaEngine:
    return LlamaEngine.load(
        ModelSpec.model_validate(
            {
                "name": model,
                "path": demo_dir / f"{model}.gguf",
                "n_ctx": 512,
                "parallel": parallel,
            }
        )
    )


class TestAdmission:
    def test_a_head_start_overtakes_earlier_arrivals(self, demo_dir: Path) -> None:
        """With the only slot busy, a later request with a head start (fast) is admitted
        before an earlier one without (creative)."""
        engine = _engine(demo_dir, parallel=1, model="demo-base")  # slow enough to queue behind
        finished: list[str] = []
        params = GenerationParams(max_tokens=4, temperature=0.7, top_p=0.95)

        def run(name: str, max_tokens: int, head_start_s: float) -> None:
            engine.complete(
                engine.tokenize("Go"),
                GenerationParams(max_tokens, params.temperature, params.top_p),
                head_start_s=head_start_s,
            )
            finished.append(name)

        try:
            busy = threading.Thread(target=run, args=("busy", 400, 0.0))
            busy.start()
            while engine.free_slots > 0:
                time.sleep(0.001)
            creative = threading.Thread(target=run, args=("creative", 4, 0.0))
            creative.start()
            time.sleep(0.05)
            fast = threading.Thread(target=run, args=("fast", 4, 2.0))
            fast.start()
            for thread in (busy, creative, fast):
                thread.join(timeout=60)
        finally:
            engine.close()
        assert finished == ["busy", "fast", "creative"]


class TestBatch:
    def test_sequences_share_steps_and_each_gets_exactly_its_tokens(self, demo_dir: Path) -> None:
        """Four requests at once run in the same steps (batches of more than one token) and
        each ends at exactly its own max_tokens; the KV cache is free afterwards."""
        engine = _engine(demo_dir, parallel=4)
        counts: dict[int, int] = {}

        def run(n: int) -> None:
            params = GenerationParams(max_tokens=10 + n, temperature=0.8, top_p=0.95, seed=n)
            counts[n] = engine.complete(engine.tokenize(f"Request {n}"), params).completion_tokens

        try:
            engine.drain_batch_sizes()
            threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            sizes = engine.drain_batch_sizes()
            usage = engine.kv_usage
        finally:
            engine.close()
        assert counts == {n: 10 + n for n in range(4)}
        assert max(sizes) > 1
        assert usage == 0.0

    def test_a_stop_string_split_across_tokens_is_never_sent(self, demo_dir: Path) -> None:
        """Text that could begin a stop string is held back until it cannot; the stop string
        itself never reaches the client, streamed or not."""
        engine = _engine(demo_dir, parallel=2)
        try:
            free = engine.complete(
                engine.tokenize("Hello"), GenerationParams(40, temperature=0.0, top_p=1.0)
            ).text
            stop = free.split()[4][:3]  # a word's start, produced over several characters
            params = GenerationParams(40, temperature=0.0, top_p=1.0, stop=(stop,))
            pieces: list[str] = []
            streamed = engine.complete(engine.tokenize("Hello"), params, pieces.append)
        finally:
            engine.close()
        assert streamed.finish_reason == "stop"
        assert stop not in "".join(pieces)
        assert "".join(pieces) == streamed.text
        assert free.startswith(streamed.text)

    @pytest.mark.parametrize("parallel", [1, 3])
    def test_a_cancelled_sequence_frees_its_slot(self, demo_dir: Path, parallel: int) -> None:
        """A consumer that stops (a client gone) frees its slot at the next step."""
        engine = _engine(demo_dir, parallel=parallel)

        def leave(piece: str) -> None:
            raise BrokenPipeError("client went away")

        try:
            with pytest.raises(BrokenPipeError):
                engine.complete(
                    engine.tokenize("Go"), GenerationParams(300, 0.7, 0.95), on_text=leave
                )
            deadline = time.monotonic() + 10
            while engine.free_slots < parallel and time.monotonic() < deadline:
                time.sleep(0.001)
            free = engine.free_slots
        finally:
            engine.close()
        assert free == parallel
