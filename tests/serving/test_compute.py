"""The machine's compute budget: the cores this process may use, and the arbiter that grants
every member's decode steps their threads, earliest deadline first, never more than the
budget."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ensemble_ops.config import ModelSpec
from ensemble_ops.serving.compute import ComputeArbiter, available_cores
from ensemble_ops.serving.engine import GenerationParams
from ensemble_ops.serving.llama_engine import LlamaEngine

AFFINITY = len(os.sched_getaffinity(0))


class TestAvailableCores:
    @pytest.mark.parametrize(
        ("cpu_max", "cores"),
        [
            ("max 100000\n", AFFINITY),
            ("100000 100000\n", 1),
            ("150000 100000\n", 1),  # one and a half CPUs: one thread, never two
            ("50000 100000\n", 1),  # half a CPU: still one thread
            (f"{(AFFINITY + 8) * 100000} 100000\n", AFFINITY),  # the affinity is smaller
            ("nonsense\n", AFFINITY),
        ],
    )
    def test_the_cgroup_quota_caps_the_affinity(
        self, tmp_path: Path, cpu_max: str, cores: int
    ) -> None:
        """cgroup v2's cpu.max caps the CPU affinity, rounded down, at least 1; a quota
        that cannot be read caps nothing."""
        file = tmp_path / "cpu.max"
        file.write_text(cpu_max)
        assert available_cores(file) == cores

    def test_no_cgroup_file_means_the_affinity(self, tmp_path: Path) -> None:
        """Outside a cgroup v2 (no file), the affinity is the answer."""
        assert available_cores(tmp_path / "missing") == AFFINITY


class TestArbiter:
    def test_a_member_alone_gets_the_whole_budget_up_to_its_cap(self) -> None:
        """Alone, a step takes every thread; a member's n_threads caps it."""
        arbiter = ComputeArbiter(4)
        with arbiter.grant("a", deadline=1.0) as threads:
            assert threads == 4
            assert arbiter.in_use == 4
        with arbiter.grant("a", deadline=1.0, cap=3) as capped:
            assert capped == 3
        assert arbiter.in_use == 0

    def test_active_members_share_the_budget(self) -> None:
        """While two members are active, each step takes half the threads, so neither waits
        for the other's step."""
        arbiter = ComputeArbiter(4, share_hold_s=60.0)
        with arbiter.grant("a", deadline=1.0):
            pass
        with arbiter.grant("b", deadline=1.0) as b, arbiter.grant("a", deadline=2.0) as a:
            assert (a, b) == (2, 2)
            assert arbiter.in_use == 4

    def test_waiting_steps_go_earliest_deadline_first(self) -> None:
        """With every thread taken, waiting steps are granted by deadline, not by arrival."""
        arbiter = ComputeArbiter(1)
        order: list[str] = []
        waiting = threading.Barrier(4)

        def step(name: str, deadline: float) -> None:
            waiting.wait()
            with arbiter.grant(name, deadline):
                order.append(name)

        with arbiter.grant("holder", deadline=0.0):
            threads = [
                threading.Thread(target=step, args=(name, deadline))
                for name, deadline in (("creative", 4.0), ("fast", 2.5), ("balanced", 3.0))
            ]
            for thread in threads:
                thread.start()
            waiting.wait()
            _until(lambda: arbiter.waiting == 3)
        for thread in threads:
            thread.join(timeout=10)
        assert order == ["fast", "balanced", "creative"]

    def test_busy_threads_never_exceed_the_budget(self) -> None:
        """Many members' steps at once from many threads: at no moment are more threads
        granted than the budget, and every step is granted."""
        arbiter = ComputeArbiter(3)
        peak = [0]
        granted = []

        def member(name: str) -> None:
            for i in range(40):
                with arbiter.grant(name, deadline=float(i)) as threads:
                    peak[0] = max(peak[0], arbiter.in_use)
                    granted.append(threads)
                    time.sleep(0.0005)

        threads = [threading.Thread(target=member, args=(f"m{i}",)) for i in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert 1 <= peak[0] <= 3
        assert len(granted) == 200
        assert min(granted) >= 1
        assert arbiter.in_use == 0

    def test_waits_and_busy_time_are_kept_per_member(self) -> None:
        """Each member's waits are drained once; its busy time only grows."""
        arbiter = ComputeArbiter(2)
        with arbiter.grant("a", deadline=0.0):
            time.sleep(0.01)
        waits = arbiter.drain_waits("a")
        assert len(waits) == 1
        assert arbiter.drain_waits("a") == []
        assert arbiter.busy_seconds("a") >= 0.01
        assert arbiter.busy_seconds("b") == 0.0

    def test_a_budget_of_nothing_is_refused(self) -> None:
        """Zero threads is a configuration mistake, said at once."""
        with pytest.raises(ValueError, match="at least one thread"):
            ComputeArbiter(0)


class _Noting(ComputeArbiter):
    """The arbiter itself, noting each grant: the member, its threads, all in use then."""

    def __init__(self, threads: int, **options: float) -> None:
        super().__init__(threads, **options)
        self.grants: list[tuple[str, int, int]] = []

    @contextmanager
    def grant(self, member: str, deadline: float, cap: int | None = None) -> Iterator[int]:
        with super().grant(member, deadline, cap) as threads:
            self.grants.append((member, threads, self.in_use))
            yield threads


class TestEngines:
    def test_two_engines_on_one_arbiter_share_its_threads(self, demo_dir: Path) -> None:
        """Two members' engines decoding at once on one arbiter of two threads: every step
        of either was granted its threads, never more than two in use, and once both were
        busy they took one each instead of waiting for each other."""
        arbiter = _Noting(2, share_hold_s=60.0)
        engines = [
            LlamaEngine.load(
                ModelSpec(name=name, path=demo_dir / "demo-small.gguf", n_ctx=256), arbiter
            )
            for name in ("a", "b")
        ]
        params = GenerationParams(max_tokens=60, temperature=0.8, top_p=0.95)
        try:
            runs = [
                threading.Thread(target=e.complete, args=(e.tokenize("Go"), params))
                for e in engines
            ]
            for run in runs:
                run.start()
            for run in runs:
                run.join(timeout=60)
        finally:
            for engine in engines:
                engine.close()
        assert {member for member, _, _ in arbiter.grants} == {"a", "b"}
        assert max(in_use for _, _, in_use in arbiter.grants) <= 2
        assert (1, 2) in {(threads, in_use) for _, threads, in_use in arbiter.grants}
        assert arbiter.in_use == 0


def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.001)
