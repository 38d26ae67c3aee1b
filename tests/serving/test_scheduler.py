"""The continuous-batching scheduler, through LlamaEngine on a generated model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ensemble_ops.config import ModelSpec
from ensemble_ops.serving.engine import Completion, EngineFailure, GenerationParams
from ensemble_ops.serving.generation import SequenceSpec
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
    def test_the_earliest_deadline_is_admitted_first(self, demo_dir: Path) -> None:
        """Queued together for the only slot, a request with a shorter latency target (fast,
        2.5 s) goes before one with a longer target (creative, 4 s) that came first: the
        deadline is arrival + target."""
        engine = _engine(demo_dir, parallel=1)
        order: list[str] = []
        tokens = engine.tokenize("Go")
        ends = {name: _Ends(name, order) for name in ("creative", "fast")}
        specs = [
            (SequenceSpec(tokens, 4, 0.7, 0.95, None, (), target_s=target), ends[name])
            for name, target in (("creative", 4.0), ("fast", 2.5))
        ]
        try:
            engine._scheduler.submit_many(specs)  # both wait at the next admission
            for end in ends.values():
                assert end.done.wait(30)
        finally:
            engine.close()
        assert order == ["fast", "creative"]

    @pytest.mark.parametrize("fair", [True, False])
    def test_callers_take_turns_within_a_priority(self, demo_dir: Path, fair: bool) -> None:
        """One slot; caller A queues four requests and B one, in that order, at the same
        priority. With callers named, B's request goes second (A has had its turn); without,
        it waits behind all of A's."""
        engine = _engine(demo_dir, parallel=1)
        order: list[str] = []
        tokens = engine.tokenize("Go")
        names = ["A1", "A2", "A3", "A4", "B1"]
        ends = {name: _Ends(name, order) for name in names}

        def spec(name: str) -> SequenceSpec:
            caller = name[0] if fair else ""
            return SequenceSpec(tokens, 4, 0.7, 0.95, None, (), target_s=2.5, caller=caller)

        _after_one(engine, spec("warm"), [(spec(name), ends[name]) for name in names])
        assert order == (["A1", "B1", "A2", "A3", "A4"] if fair else names)

    def test_turns_stay_within_a_mode(self, demo_dir: Path) -> None:
        """Turns never beat the modes' priorities: A's two fast requests go before B's
        creative one, although B has had no turn yet."""
        engine = _engine(demo_dir, parallel=1)
        order: list[str] = []
        tokens = engine.tokenize("Go")
        targets = {"A-fast-1": 2.5, "A-fast-2": 2.5, "B-creative": 4.0}
        ends = {name: _Ends(name, order) for name in targets}

        def spec(name: str, target_s: float) -> SequenceSpec:
            return SequenceSpec(tokens, 4, 0.7, 0.95, None, (), target_s=target_s, caller=name[0])

        queued = [(spec(name, target), ends[name]) for name, target in targets.items()]
        _after_one(engine, spec("A-warm", 2.5), [queued[2], queued[0], queued[1]])
        assert order == ["A-fast-1", "A-fast-2", "B-creative"]

    def test_a_weight_is_a_larger_share(self, demo_dir: Path) -> None:
        """Weight 2 against 1, both queuing four: the heavier caller gets two turns for each
        of the other's (four of the first six)."""
        engine = _engine(demo_dir, parallel=1)
        order: list[str] = []
        tokens = engine.tokenize("Go")
        names = [f"{caller}{i}" for caller in "HL" for i in range(4)]
        ends = {name: _Ends(name, order) for name in names}

        def spec(name: str) -> SequenceSpec:
            weight = 2.0 if name[0] == "H" else 1.0
            return SequenceSpec(
                tokens, 4, 0.7, 0.95, None, (), target_s=2.5, caller=name[0], weight=weight
            )

        _after_one(engine, spec("warm"), [(spec(name), ends[name]) for name in names])
        assert sorted(order[:6]) == ["H0", "H1", "H2", "H3", "L0", "L1"]


def _after_one(
    engine: LlamaEngine, first: SequenceSpec, queued: list[tuple[SequenceSpec, _Ends]]
) -> None:
    """Run ``first`` alone (the only slot is then free), then queue ``queued`` together for
    one admission, wait for all and close the engine."""
    try:
        warm = _Ends("warm", [])
        engine._scheduler.submit(first, warm)
        assert warm.done.wait(30)
        engine._scheduler.submit_many(queued)
        for _, end in queued:
            assert end.done.wait(30)
    finally:
        engine.close()


class _Ends:
    """A sink that notes the order in which sequences end (and when one first spoke)."""

    def __init__(self, name: str, order: list[str], *, hold: bool = False) -> None:
        self.name = name
        self.order = order
        self.first = threading.Event()
        self.done = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def piece(self, text: str) -> None:
        self.first.set()
        self.release.wait(30)  # held: the scheduler's thread waits here

    def end(self, outcome: Completion | EngineFailure) -> None:
        self.order.append(self.name)
        self.done.set()


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


class TestExpectedWait:
    def test_the_wait_counts_the_sequences_a_request_cannot_overtake(self, demo_dir: Path) -> None:
        """With the only slot taken and one sequence queued (target 3 s), a request that
        could overtake it (target 2.5 s) expects one slot's hold time, one that could not
        (target 4 s) two; with a free slot, none."""
        engine = _engine(demo_dir, parallel=1)
        try:
            assert engine.expected_wait_s(2.5) == 0.0
            for _ in range(2):  # the hold times it learns from
                engine.complete(engine.tokenize("Go"), GenerationParams(8, 0.7, 0.95))
            assert engine.expected_wait_s(2.5) == 0.0  # the slot is free
            order: list[str] = []
            busy, queued = _Ends("busy", order, hold=True), _Ends("queued", order)
            tokens = engine.tokenize("Go")
            busy_ticket = engine._scheduler.submit(
                SequenceSpec(tokens, 400, 0.7, 0.95, None, ()), busy
            )
            # Its first piece holds the scheduler's thread until released: the slot stays
            # taken and the queue stays as it is, by construction.
            assert busy.first.wait(30)
            queued_ticket = engine._scheduler.submit(
                SequenceSpec(tokens, 400, 0.7, 0.95, None, (), target_s=3.0), queued
            )
            overtaking, behind = engine.expected_wait_s(2.5), engine.expected_wait_s(4.0)
            busy_ticket.cancel()
            queued_ticket.cancel()
            busy.release.set()
            assert queued.done.wait(30)
        finally:
            engine.close()
        assert overtaking > 0
        assert behind == pytest.approx(2 * overtaking)
