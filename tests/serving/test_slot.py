"""ModelSlot and Loaded: leases, the queue bound, the atomic swap, draining."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Literal

import anyio
import pytest

from ensemble_ops.config import ModelSpec
from ensemble_ops.errors import ModelUnavailableError, OverloadedError
from ensemble_ops.events import ModelLoaded
from ensemble_ops.serving.engine import EngineInfo
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.serving.slot import Loaded, ModelSlot, loaded_event

from ..conftest import FlakyEngine


@pytest.fixture(name="spec")
def _spec(demo_dir: Path) -> ModelSpec:
    return ModelSpec(
        name="demo-tiny", path=demo_dir / "demo-tiny.gguf", n_ctx=256, queue_size=1, parallel=1
    )


def _loaded(spec: ModelSpec) -> Loaded:
    return Loaded(spec.name, LlamaEngine.load(spec), queue_size=spec.queue_size)


class TestModelSlot:
    async def test_no_instance_is_unavailable(self, spec: ModelSpec) -> None:
        """Before loading, a lease fails with the reason."""
        slot = ModelSlot(spec)
        with pytest.raises(ModelUnavailableError, match="still loading") as loading:
            slot.acquire()
        assert loading.value.name == "demo-tiny"
        slot.mark_failed("boom")
        with pytest.raises(ModelUnavailableError, match=r"failed to load \(boom\)"):
            slot.acquire()

    async def test_leases_count_and_bound(self, spec: ModelSpec) -> None:
        """One running plus queue_size waiting; the next is refused; release frees a place."""
        slot = ModelSlot(spec)
        loaded = _loaded(spec)
        slot.swap(loaded)
        first, second = slot.acquire(), slot.acquire()
        assert loaded.in_flight == 2
        with pytest.raises(OverloadedError, match=r"\(1 requests already waiting\)") as full:
            slot.acquire()
        assert full.value.name == "demo-tiny"
        first.release()
        first.release()  # idempotent
        assert loaded.in_flight == 1
        slot.acquire().release()
        second.release()
        assert loaded.in_flight == 0
        await loaded.close()

    async def test_swap_is_atomic_and_old_drains(self, spec: ModelSpec) -> None:
        """After swap, new leases get the new instance; the old one drains its own."""
        slot = ModelSlot(spec)
        old, new = _loaded(spec), _loaded(spec)
        slot.swap(old)
        held = slot.acquire()
        assert slot.swap(new) is old
        assert slot.acquire().loaded is new
        assert held.loaded is old
        assert not await old.wait_idle(0.05)  # still held: the drain times out
        async with anyio.create_task_group() as tasks:

            async def release_later() -> None:
                await anyio.sleep(0.05)
                held.release()

            tasks.start_soon(release_later)
            assert await old.wait_idle(5.0)
        assert old.generation != new.generation
        await old.close()
        await new.close()

    @pytest.mark.parametrize(
        ("state", "reason"),
        [
            ("loading", "the model is still loading"),
            ("reloading", "the model is being reloaded (its old copy was unloaded first)"),
            ("stopped", "the model is not loaded"),
        ],
    )
    async def test_each_state_says_why_it_cannot_serve(
        self, spec: ModelSpec, state: Literal["loading", "reloading", "stopped"], reason: str
    ) -> None:
        """Without an active copy the reason names the state; with one there is none."""
        slot = ModelSlot(spec)
        old = None
        if state != "loading":
            old = slot.install(LlamaEngine.load(spec))
            assert slot.unavailable_reason() is None
            assert slot.unload(state) is old
        assert slot.unavailable_reason() == reason
        with pytest.raises(ModelUnavailableError) as refused:
            slot.acquire()
        assert refused.value.reason == reason
        if old is not None:
            await old.close()

    async def test_unload_hands_back_the_copy_and_swap_the_replaced_one(
        self, spec: ModelSpec
    ) -> None:
        """unload returns the copy that was serving (None when none was); swap changes the
        spec only when given one."""
        slot = ModelSlot(spec)
        assert slot.unload("stopped") is None
        loaded = slot.install(LlamaEngine.load(spec))
        assert slot.state == "ready"
        assert slot.spec is spec
        assert slot.unload("reloading") is loaded
        assert (slot.state, slot.active) == ("reloading", None)
        bigger = spec.model_copy(update={"queue_size": 5})
        assert slot.swap(loaded, bigger) is None
        assert (slot.state, slot.spec, slot.active) == ("ready", bigger, loaded)
        await loaded.close()


class TestLoaded:
    async def test_worker_threads_are_bounded_by_the_copys_capacity(self, spec: ModelSpec) -> None:
        """Requests run side by side (the engine batches them), at most parallel +
        queue_size + one for a probe, so a busy member never takes every thread."""
        loaded = _loaded(spec)
        running: list[int] = []
        most: list[int] = []
        lock = threading.Lock()

        def work() -> None:
            with lock:
                running.append(1)
                most.append(len(running))
            time.sleep(0.05)
            with lock:
                running.pop()

        async with anyio.create_task_group() as tasks:
            for _ in range(6):
                tasks.start_soon(loaded.run, work)
        assert loaded.capacity == 2
        assert max(most) == loaded.capacity + 1
        await loaded.close()

    async def test_running_since_is_set_only_while_an_inference_runs(self, spec: ModelSpec) -> None:
        """The watchdog's clock: when the running inference started, None when idle."""
        loaded = _loaded(spec)
        seen: list[float | None] = []
        before = time.monotonic()
        await loaded.run(lambda: seen.append(loaded.running_since))
        assert seen[0] is not None
        assert before <= seen[0] <= time.monotonic()
        assert loaded.running_since is None
        with pytest.raises(ZeroDivisionError):
            await loaded.run(lambda: 1 / 0)
        assert loaded.running_since is None
        await loaded.close()

    async def test_oldest_lease_is_the_age_of_the_longest_held(self, spec: ModelSpec) -> None:
        """The watchdog's lease age: now minus when the earliest lease still held began."""
        slot = ModelSlot(spec)
        loaded = slot.install(LlamaEngine.load(spec))
        assert loaded.oldest_lease_s(time.monotonic()) == 0.0
        first = slot.acquire()
        second = slot.acquire()
        now = second.acquired_at + 7.0
        assert loaded.oldest_lease_s(now) == now - first.acquired_at
        first.release()
        assert loaded.oldest_lease_s(now) == 7.0
        second.release()
        assert loaded.oldest_lease_s(now) == 0.0
        await loaded.close()

    async def test_a_close_waits_for_the_running_inference(self, spec: ModelSpec) -> None:
        """Freeing the model under a running inference would crash: close waits for it, and
        a second close does nothing."""
        engine = FlakyEngine(LlamaEngine.load(spec), failing=False)
        loaded = Loaded(spec.name, engine, queue_size=spec.queue_size)
        release = threading.Event()
        closed_during_run: list[bool] = []

        def inference() -> None:
            release.wait(10)
            closed_during_run.append(engine.closed)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(loaded.run, inference)
            await anyio.sleep(0.05)
            tasks.start_soon(loaded.close)
            await anyio.sleep(0.05)
            assert not engine.closed
            release.set()
        assert closed_during_run == [False]
        assert engine.closed
        assert loaded.closed
        await loaded.close()

    async def test_a_claim_takes_a_free_thread_and_run_claimed_frees_it(
        self, spec: ModelSpec
    ) -> None:
        """claim succeeds while a thread is free, refuses when all are taken, and
        run_claimed gives the thread back."""
        loaded = _loaded(spec)
        tokens = [loaded.claim() for _ in range(loaded.capacity + 1)]
        with pytest.raises(anyio.WouldBlock):
            loaded.claim()
        seen: list[str] = []
        await loaded.run_claimed(tokens.pop(), seen.append, "claimed")
        again = loaded.claim()  # the thread is free again
        await loaded.run_claimed(again, seen.append, "again")
        for token in tokens:
            await loaded.run_claimed(token, seen.append, "rest")
        assert seen == ["claimed", "again", "rest", "rest"]
        await loaded.close()


class TestRetryAfter:
    async def test_the_hint_follows_the_measured_rate_and_the_queue(self, spec: ModelSpec) -> None:
        """Without two answers in the last minute the hint is 1 s; then it is the requests
        ahead divided by the measured answer rate, never under 1 s nor over 60 s."""
        slot = ModelSlot(spec.model_copy(update={"queue_size": 400}))
        loaded = slot.install(LlamaEngine.load(spec))
        assert loaded.retry_after_s() == 1
        await loaded.run(time.sleep, 0.25)
        assert loaded.retry_after_s() == 1  # one answer is no rate
        for _ in range(2):
            await loaded.run(time.sleep, 0.25)
        # About 4 answers a second: 1 s for a short queue.
        assert loaded.retry_after_s() == 1
        held = [slot.acquire() for _ in range(21)]
        assert 5 <= loaded.retry_after_s() <= 7  # 21 ahead at ~4/s: ~5.25 s
        held += [slot.acquire() for _ in range(379)]
        assert loaded.retry_after_s() == 60  # 400 ahead: ~100 s, capped
        for lease in held:
            lease.release()
        assert loaded.retry_after_s() == 1
        await loaded.close()

    async def test_a_full_member_says_when_to_retry(self, spec: ModelSpec) -> None:
        """The 503 of a full member carries the hint."""
        slot = ModelSlot(spec.model_copy(update={"queue_size": 8}))
        loaded = slot.install(LlamaEngine.load(spec))
        for _ in range(3):
            await loaded.run(time.sleep, 0.25)
        held = [slot.acquire() for _ in range(loaded.capacity)]
        with pytest.raises(OverloadedError) as full:
            slot.acquire()
        assert full.value.retry_after_s == loaded.retry_after_s() > 1  # 9 ahead at ~4/s
        for lease in held:
            lease.release()
        await loaded.close()


class _GpuEngine(FlakyEngine):
    """A real engine that reports part of itself on a GPU (this machine has none)."""

    @property
    def info(self) -> EngineInfo:
        return dataclasses.replace(self.real.info, gpu_bytes=12345)


class TestLoadedEvent:
    async def test_the_announcement_describes_the_copy(self, spec: ModelSpec) -> None:
        """ModelLoaded carries the member, the copy's generation, its sizes and load time."""
        engine = _GpuEngine(LlamaEngine.load(spec), failing=False)
        loaded = Loaded(spec.name, engine)
        info = engine.real.info
        assert loaded_event(loaded, 1.5) == ModelLoaded(
            "demo-tiny",
            loaded.generation,
            info.weights_bytes,
            info.context_bytes,
            1.5,
            gpu_bytes=12345,
        )
        await loaded.close()
