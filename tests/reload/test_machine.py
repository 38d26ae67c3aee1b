"""One member's reload machine: its states, progress, memory check, rollback and status."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from ensemble_ops.config import ModelSpec, ReloadSettings, Settings
from ensemble_ops.errors import ReloadConflictError
from ensemble_ops.events import (
    DrainTimedOut,
    EventBus,
    ModelLoaded,
    ModelUnloaded,
    ReloadFinished,
    ReloadProgressed,
    ReloadStateChanged,
)
from ensemble_ops.reload.machine import STATES, TRANSITIONS
from ensemble_ops.reload.manager import ReloadManager
from ensemble_ops.serving.engine import ChatMessage, ChatPrompt, Engine
from ensemble_ops.serving.gpu import GpuMonitor
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.serving.slot import ModelSlot
from ensemble_ops.tasks import TaskRunner

from ..conftest import FlakyEngine, Recorded

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
MIB = 2**20


class _Memory:
    """Free memory as the reload's check sees it (a fixed figure), or an error."""

    def __init__(self) -> None:
        self.free = 2**50
        self.kind = "RAM"
        self.error: Exception | None = None
        self.asked: list[ModelSpec] = []

    def __call__(self, spec: ModelSpec) -> tuple[int, str]:
        self.asked.append(spec)
        if self.error is not None:
            raise self.error
        return self.free, self.kind


class _Events(Recorded):
    """What the reload publishes, in order."""

    def __init__(self, bus: EventBus) -> None:
        kinds = (ReloadStateChanged, ReloadProgressed, ReloadFinished, ModelLoaded)
        super().__init__(bus, *kinds, ModelUnloaded, DrainTimedOut)

    @property
    def states(self) -> list[tuple[str, str, float]]:
        return [(e.from_state, e.to_state, e.progress_percent) for e in self.of(ReloadStateChanged)]

    @property
    def progress(self) -> list[tuple[str, float]]:
        return [(e.state, e.progress_percent) for e in self.of(ReloadProgressed)]


class _Copy(FlakyEngine):
    """A real engine (FlakyEngine tells when it is closed) that records the chats it renders."""

    def __init__(self, real: LlamaEngine) -> None:
        super().__init__(real, failing=False)
        self.chats: list[list[ChatMessage]] = []

    def render_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        self.chats.append(list(messages))
        return super().render_chat(messages)


class _Loads:
    """The copies the reloads load: real engines, recorded; ``failing`` makes a load fail."""

    def __init__(self) -> None:
        self.engines: list[_Copy] = []
        self.failing = False

    def __call__(self, spec: ModelSpec) -> Engine:
        if self.failing:
            raise OSError("the disk went away")
        engine = _Copy(LlamaEngine.load(spec))
        self.engines.append(engine)
        return engine


@pytest.fixture(name="spec")
def _spec(demo_dir: Path) -> ModelSpec:
    return ModelSpec(name="demo-tiny", path=demo_dir / "demo-tiny.gguf", n_ctx=256)


@pytest.fixture(name="bus")
def _bus() -> EventBus:
    return EventBus()


@pytest.fixture(name="events")
def _events(bus: EventBus) -> _Events:
    return _Events(bus)


@pytest.fixture(name="memory")
def _memory() -> _Memory:
    return _Memory()


@pytest.fixture(name="loads")
def _loads() -> _Loads:
    return _Loads()


@pytest.fixture(name="slot")
def _slot(spec: ModelSpec, loads: _Loads) -> ModelSlot:
    """The member, serving its first copy."""
    slot = ModelSlot(spec)
    slot.install(loads(spec))
    return slot


ManagerFactory = Callable[..., ReloadManager]


@pytest.fixture(name="make_manager")
async def _make_manager(
    bus: EventBus, memory: _Memory, loads: _Loads
) -> AsyncIterator[ManagerFactory]:
    """Reload managers over given slots; their tasks and copies are closed afterwards."""
    runner = TaskRunner()
    slots: list[ModelSlot] = []

    def make(slot: ModelSlot, **settings: Any) -> ReloadManager:
        slots.append(slot)
        return ReloadManager(
            bus,
            {slot.name: slot},
            ReloadSettings(**{"warmup_iterations": 2, "drain_timeout_s": 2.0, **settings}),
            runner,
            loader=loads,
            gpu=GpuMonitor(),
            memory_probe=memory,
        )

    try:
        yield make
    finally:
        await runner.aclose()
        for slot in slots:
            active = slot.unload("stopped")
            if active is not None:
                await active.close()


@pytest.fixture(name="manager")
def _manager(make_manager: ManagerFactory, slot: ModelSlot) -> ReloadManager:
    return make_manager(slot)


def _need(slot: ModelSlot, headroom: float = 1.1) -> int:
    """Bytes the memory check asks for: the new file plus the serving copy's context."""
    active = slot.active
    assert active is not None
    return int((slot.spec.path.stat().st_size + active.engine.info.context_bytes) * headroom)


class TestMachine:
    def test_a_reload_may_start_again_only_once_the_last_one_ended(self) -> None:
        """start leaves idle or an ended reload; every running state can fail, and only the
        rollout states roll back."""
        start = next(t for t in TRANSITIONS if t["trigger"] == "start")
        fail = next(t for t in TRANSITIONS if t["trigger"] == "fail")
        roll_back = next(t for t in TRANSITIONS if t["trigger"] == "roll_back")
        rolling = ["awaiting_promotion", "canary", "shadowing"]
        assert sorted(start["source"]) == ["completed", "failed", "idle", "rolled_back"]
        assert sorted(fail["source"]) == sorted(["ready", "switching", "warming_up", *rolling])
        assert sorted(roll_back["source"]) == rolling
        assert set(STATES) == {
            "idle",
            "warming_up",
            "ready",
            "switching",
            "completed",
            "failed",
            "rolled_back",
            *rolling,
        }


class TestProgress:
    async def test_a_reload_walks_every_state_and_reports_progress_in_order(
        self, manager: ReloadManager, slot: ModelSlot, events: _Events, loads: _Loads
    ) -> None:
        """idle -> warming_up -> ready -> switching -> completed, progress 0 -> 100, each
        warm-up iteration at its own step; the old copy is closed after the switch."""
        old = slot.active
        status = await manager.reload_model("demo-tiny")
        assert status.state == "completed"
        assert events.states == [
            ("idle", "warming_up", 0.0),
            ("warming_up", "ready", 80.0),
            ("ready", "switching", 80.0),
            ("switching", "completed", 100.0),
        ]
        assert events.progress == [
            ("warming_up", 5.0),
            ("warming_up", 10.0),
            ("warming_up", 30.0),
            ("warming_up", 55.0),
            ("warming_up", 80.0),
            ("switching", 90.0),
            ("switching", 100.0),
        ]
        messages = [e.message for e in events.of(ReloadProgressed)]
        assert messages[2:4] == ["Warmup iteration 1/2", "Warmup iteration 2/2"]
        new = slot.active
        assert new is not None
        assert new is not old
        assert f"Serving generation {new.generation}" in status.message
        assert status.message.endswith("old copy closed")
        assert loads.engines[0].closed
        assert not loads.engines[1].closed
        elapsed = [e.elapsed_s for e in events.of(ReloadStateChanged)]
        assert elapsed == sorted(elapsed)
        assert 0 <= elapsed[0] < elapsed[-1] < 60
        finished = events.of(ReloadFinished)
        assert [(f.model, f.outcome, f.error) for f in finished] == [
            ("demo-tiny", "completed", None)
        ]
        loaded = events.of(ModelLoaded)
        assert [(e.model, e.generation) for e in loaded] == [("demo-tiny", new.generation)]
        assert old is not None
        unloaded = events.of(ModelUnloaded)
        assert [(e.model, e.generation) for e in unloaded] == [("demo-tiny", old.generation)]

    async def test_the_status_while_queued_and_after(
        self, manager: ReloadManager, slot: ModelSlot
    ) -> None:
        """Before any reload: idle; once started (before its task runs): warming_up at 0 with
        a start time; after it: completed at 100 with an end time."""
        idle = manager.get_reload_status("demo-tiny")
        assert (idle.state, idle.progress_percent, idle.started_at, idle.completed_at) == (
            "idle",
            0.0,
            None,
            None,
        )
        before = time.time()
        queued = manager.start_reload("demo-tiny")
        assert (queued.state, queued.progress_percent, queued.message) == (
            "warming_up",
            0.0,
            "Reload queued",
        )
        assert queued.running
        assert queued.started_at is not None
        assert ISO_Z.match(queued.started_at)
        assert queued.completed_at is None
        done = await manager.wait_for_reload("demo-tiny")
        assert (done.state, done.progress_percent, done.error) == ("completed", 100.0, None)
        assert not done.running
        assert done.completed_at is not None
        assert ISO_Z.match(done.completed_at)
        assert done.started_at == queued.started_at
        started = time.mktime(time.strptime(queued.started_at[:19], "%Y-%m-%dT%H:%M:%S"))
        assert abs(started - time.timezone - before) < 5  # UTC, not local time
        assert queued.started_at <= done.completed_at

    async def test_a_new_reload_starts_with_a_clean_status(
        self, manager: ReloadManager, slot: ModelSlot
    ) -> None:
        """After a failed reload, the next one has no error nor end time until it ends."""
        failed = await manager.reload_model("demo-tiny", warmup_func=lambda engine: "")
        assert failed.error is not None
        again = manager.start_reload("demo-tiny")
        assert (again.error, again.completed_at, again.progress_percent) == (None, None, 0.0)
        assert (await manager.wait_for_reload("demo-tiny")).state == "completed"

    async def test_warmup_iterations_are_counted_from_the_plan(
        self, manager: ReloadManager, events: _Events
    ) -> None:
        """N iterations run N warm-ups, each reported as i/N, spread over 30..80%."""
        calls: list[Engine] = []

        def warm(engine: Engine) -> bool:
            calls.append(engine)
            return True

        status = await manager.reload_model("demo-tiny", warmup_func=warm, warmup_iterations=4)
        assert status.state == "completed"
        assert len(calls) == 4
        warmups = [
            (e.progress_percent, e.message)
            for e in events.of(ReloadProgressed)
            if e.message.startswith("Warmup")
        ]
        assert warmups == [
            (30.0, "Warmup iteration 1/4"),
            (42.5, "Warmup iteration 2/4"),
            (55.0, "Warmup iteration 3/4"),
            (67.5, "Warmup iteration 4/4"),
        ]

    async def test_a_reload_of_a_member_with_no_copy_loads_one(
        self, make_manager: ManagerFactory, spec: ModelSpec, memory: _Memory, events: _Events
    ) -> None:
        """A member that failed to load at start-up is loaded by a reload, without a memory
        check for a second copy, and serves at once."""
        slot = ModelSlot(spec)
        slot.mark_failed("file was missing")
        manager = make_manager(slot)
        status = await manager.reload_model("demo-tiny")
        assert status.state == "completed"
        assert slot.active is not None
        assert slot.state == "ready"
        assert memory.asked == []
        assert status.message == f"Serving generation {slot.active.generation}"
        assert events.progress[-1] == ("switching", 100.0)

    async def test_requests_still_on_the_old_copy_are_counted(
        self, make_manager: ManagerFactory, slot: ModelSlot, loads: _Loads
    ) -> None:
        """A request running on the old copy past drain_timeout_s: the reload completes and
        says how many requests the old copy still has; it closes after them."""
        manager = make_manager(slot, drain_timeout_s=0.1)
        held = [slot.acquire(), slot.acquire()]
        status = await manager.reload_model("demo-tiny")
        assert status.state == "completed"
        assert status.message.endswith("old copy closes when its 2 request(s) end")
        assert not loads.engines[0].closed
        for lease in held:
            lease.release()
        with anyio.fail_after(10):
            while not loads.engines[0].closed:
                await anyio.sleep(0.01)


class TestPlan:
    async def test_the_members_own_warmup_settings_come_before_the_defaults(
        self, make_manager: ManagerFactory, spec: ModelSpec, loads: _Loads
    ) -> None:
        """The member's warm-up prompt and iterations win over [reload]'s; an explicit
        iteration count wins over both; the default warm-up chats the prompt as the user."""
        slot = ModelSlot(spec.model_copy(update={"warmup_prompt": "Ping?", "warmup_iterations": 3}))
        slot.install(loads(slot.spec))
        manager = make_manager(slot, warmup_prompt="Hello?", warmup_max_tokens=2)
        assert (await manager.reload_model("demo-tiny")).state == "completed"
        assert loads.engines[1].chats == [[ChatMessage("user", "Ping?")]] * 3
        assert (await manager.reload_model("demo-tiny", warmup_iterations=1)).state == "completed"
        assert len(loads.engines[2].chats) == 1

    async def test_the_reloads_defaults_apply_without_member_settings(
        self, manager: ReloadManager, loads: _Loads
    ) -> None:
        """Without member settings the [reload] prompt and iteration count are used."""
        assert (await manager.reload_model("demo-tiny")).state == "completed"
        assert loads.engines[1].chats == [[ChatMessage("user", "Hello, how are you?")]] * 2

    async def test_a_new_spec_is_loaded_and_kept(
        self, manager: ReloadManager, slot: ModelSlot, loads: _Loads
    ) -> None:
        """A reload to a changed spec loads the copy with it, and the member keeps it."""
        bigger = slot.spec.model_copy(update={"n_ctx": 512})
        manager.start_reload("demo-tiny", spec=bigger)
        status = await manager.wait_for_reload("demo-tiny")
        assert status.state == "completed"
        assert slot.spec == bigger
        assert loads.engines[1].info.n_ctx == 512
        assert manager.get_active_model("demo-tiny") is loads.engines[1]

    async def test_one_reload_at_a_time(self, manager: ReloadManager) -> None:
        """A second reload while one runs is refused with the running one's state."""
        manager.start_reload("demo-tiny")
        with pytest.raises(ReloadConflictError, match=r"already running \(warming_up, 0%\)"):
            manager.start_reload("demo-tiny")
        assert (await manager.wait_for_reload("demo-tiny")).state == "completed"
        assert manager.start_reload("demo-tiny").running
        assert (await manager.wait_for_reload("demo-tiny")).state == "completed"


class TestConfigReload:
    async def test_only_members_whose_spec_changed_reload(
        self, make_manager: ManagerFactory, slot: ModelSlot, demo_dir: Path
    ) -> None:
        """SIGHUP's new settings: a changed member reloads to its new spec, an unchanged one
        does not, and members added or removed are reported, not applied."""
        manager = make_manager(slot)

        def settings(n_ctx: int) -> Settings:
            tiny = {"name": "demo-tiny", "path": str(slot.spec.path), "n_ctx": n_ctx}
            added = {"name": "demo-new", "path": str(demo_dir / "demo-small.gguf")}
            return Settings.from_mapping({"models": [tiny, added]}, environ={})

        assert manager.apply_settings(settings(256)) == {
            "demo-new": "added to the config: restart to load it"
        }
        assert manager.get_reload_status("demo-tiny").state == "idle"
        assert manager.apply_settings(settings(512)) == {
            "demo-tiny": "reloading",
            "demo-new": "added to the config: restart to load it",
        }
        assert manager.apply_settings(settings(1024))["demo-tiny"] == (
            "a reload is already running"
        )
        assert (await manager.wait_for_reload("demo-tiny")).state == "completed"
        assert slot.spec.n_ctx == 512
        other = Settings.from_mapping(
            {"models": [{"name": "demo-new", "path": str(demo_dir / "demo-small.gguf")}]},
            environ={},
        )
        assert manager.apply_settings(other) == {
            "demo-tiny": "removed from the config: restart to drop it",
            "demo-new": "added to the config: restart to load it",
        }
        assert manager.get_reload_status("demo-tiny").state == "completed"


class TestMemoryCheck:
    async def test_exactly_enough_memory_for_a_second_copy_is_enough(
        self, manager: ReloadManager, slot: ModelSlot, memory: _Memory
    ) -> None:
        """The check asks for (file size + the serving copy's context) x memory_headroom."""
        memory.free = _need(slot)
        status = await manager.reload_model("demo-tiny")
        assert status.state == "completed"
        assert memory.asked == [slot.spec]

    async def test_one_byte_short_fails_and_says_how_much(
        self, manager: ReloadManager, slot: ModelSlot, memory: _Memory, loads: _Loads
    ) -> None:
        """Short of memory: fail before loading, naming the memory, need and free; the old
        copy keeps serving."""
        old = slot.active
        memory.free, memory.kind = _need(slot) - 1, "VRAM"
        status = await manager.reload_model("demo-tiny")
        assert status.state == "failed"
        need_mib = _need(slot) / MIB
        assert status.error == (
            f"not enough VRAM for a second copy: need {need_mib:.0f} MiB, "
            f"{(_need(slot) - 1) / MIB:.0f} MiB free "
            '(reload_strategy = "replace" would unload the old copy first)'
        )
        assert slot.active is old
        assert len(loads.engines) == 1  # the new copy was never loaded

    async def test_the_headroom_setting_scales_the_need(
        self, make_manager: ManagerFactory, slot: ModelSlot, memory: _Memory
    ) -> None:
        """memory_headroom = 2 asks for twice the copy's size."""
        manager = make_manager(slot, memory_headroom=2.0)
        memory.free = _need(slot, 2.0) - 1
        assert (await manager.reload_model("demo-tiny")).state == "failed"
        memory.free = _need(slot, 2.0)
        assert (await manager.reload_model("demo-tiny")).state == "completed"

    async def test_replace_unloads_the_old_copy_first(
        self,
        make_manager: ManagerFactory,
        spec: ModelSpec,
        loads: _Loads,
        memory: _Memory,
        events: _Events,
    ) -> None:
        """reload_strategy = "replace" and too little memory: the old copy is unloaded and
        closed before the new one loads; the new one then serves."""
        slot = ModelSlot(spec.model_copy(update={"reload_strategy": "replace"}))
        slot.install(loads(slot.spec))
        manager = make_manager(slot)
        memory.free = 0
        closed_at_load: list[bool] = []
        old_engine = loads.engines[0]

        def load() -> Engine:
            closed_at_load.append(old_engine.closed)
            return loads(slot.spec)

        status = await manager.reload_model("demo-tiny", loader_func=load)
        assert status.state == "completed"
        assert closed_at_load == [True]
        assert slot.active is not None
        assert slot.active.engine is loads.engines[1]
        assert ("warming_up", 2.0) in events.progress

    async def test_a_failed_replace_brings_the_previous_copy_back(
        self, make_manager: ManagerFactory, spec: ModelSpec, loads: _Loads, memory: _Memory
    ) -> None:
        """replace, then the new copy fails its warm-up: the previous spec is loaded again
        and serves; the failed copy is closed."""
        original = spec.model_copy(update={"reload_strategy": "replace"})
        slot = ModelSlot(original)
        slot.install(loads(original))
        manager = make_manager(slot)
        memory.free = 0
        status = await manager.reload_model("demo-tiny", warmup_func=lambda engine: "")
        assert status.state == "failed"
        with anyio.fail_after(30):
            while slot.active is None:
                await anyio.sleep(0.01)
        assert slot.spec == original
        assert slot.state == "ready"
        assert len(loads.engines) == 3  # the first copy, the failed one, the restored one
        assert slot.active.engine is loads.engines[2]
        with anyio.fail_after(10):
            while not loads.engines[1].closed:
                await anyio.sleep(0.01)

    async def test_replace_waits_for_the_old_copys_requests_before_loading(
        self,
        make_manager: ManagerFactory,
        spec: ModelSpec,
        loads: _Loads,
        memory: _Memory,
        events: _Events,
    ) -> None:
        """replace must free the old copy's memory: past drain_timeout_s it reports the
        requests still running, keeps waiting for them, and only then loads the new copy."""
        slot = ModelSlot(spec.model_copy(update={"reload_strategy": "replace"}))
        old = slot.install(loads(slot.spec))
        manager = make_manager(slot, drain_timeout_s=0.05)
        memory.free = 0
        held = slot.acquire()
        manager.start_reload("demo-tiny")
        with anyio.fail_after(10):
            while not events.of(DrainTimedOut):
                await anyio.sleep(0.01)
        await anyio.sleep(0.2)
        assert len(loads.engines) == 1  # nothing loaded while the old copy is in use
        held.release()
        status = await manager.wait_for_reload("demo-tiny")
        assert status.state == "completed"
        drained = events.of(DrainTimedOut)
        assert [(d.model, d.generation, d.in_flight) for d in drained] == [
            ("demo-tiny", old.generation, 1)
        ]
        assert loads.engines[0].closed

    async def test_a_replaced_copy_that_cannot_load_again_marks_the_member_failed(
        self, make_manager: ManagerFactory, spec: ModelSpec, loads: _Loads, memory: _Memory
    ) -> None:
        """replace, the new copy fails, and the previous one does not load again either: the
        member is failed, saying so (health shows it unhealthy instead of loading forever)."""
        slot = ModelSlot(spec.model_copy(update={"reload_strategy": "replace"}))
        slot.install(loads(slot.spec))
        manager = make_manager(slot)
        memory.free = 0

        def warm_then_break_the_disk(engine: Engine) -> str:
            loads.failing = True
            return ""

        status = await manager.reload_model("demo-tiny", warmup_func=warm_then_break_the_disk)
        assert status.state == "failed"
        with anyio.fail_after(10):
            while slot.state != "failed":
                await anyio.sleep(0.01)
        assert slot.active is None
        assert slot.error == (
            "reload failed and the previous copy did not load again: the disk went away"
        )

    async def test_an_error_in_the_check_itself_fails_the_reload_with_its_type(
        self, manager: ReloadManager, slot: ModelSlot, memory: _Memory, events: _Events
    ) -> None:
        """An unexpected exception in a state's work fails the reload (named by its type) and
        rolls back; nothing is left running."""
        old = slot.active
        memory.error = OSError("NVML went away")
        status = await manager.reload_model("demo-tiny")
        assert status.state == "failed"
        assert status.error == "OSError: NVML went away"
        assert status.message == "Reload failed: OSError: NVML went away"
        assert slot.active is old
        assert events.states == [("idle", "warming_up", 0.0), ("warming_up", "failed", 0.0)]
        finished = events.of(ReloadFinished)
        assert [(f.outcome, f.error) for f in finished] == [("failed", "OSError: NVML went away")]


class TestFailures:
    async def test_a_loader_that_raises_fails_the_reload_and_keeps_the_old_copy(
        self, manager: ReloadManager, slot: ModelSlot
    ) -> None:
        """A load error ends the reload as failed with the loader's message."""
        old = slot.active

        def broken() -> Engine:
            raise ValueError("out of file handles")

        status = await manager.reload_model("demo-tiny", loader_func=broken)
        assert (status.state, status.error) == ("failed", "load failed: out of file handles")
        assert status.progress_percent == 0.0
        assert status.completed_at is not None
        assert slot.active is old

    async def test_shutdown_during_a_reload_closes_the_new_copy(
        self, manager: ReloadManager, slot: ModelSlot, loads: _Loads
    ) -> None:
        """Cancelling a reload mid-warm-up (shutdown) frees the new copy; the old serves."""
        old = slot.active
        started = threading.Event()
        release = threading.Event()

        def slow(engine: Engine) -> bool:
            started.set()
            release.wait(10)
            return True

        manager.start_reload("demo-tiny", warmup_func=slow)
        with anyio.fail_after(10):
            while not started.is_set():
                await anyio.sleep(0.01)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(manager.runner.aclose)
            await anyio.sleep(0.05)
            release.set()
        with anyio.fail_after(10):
            while not loads.engines[1].closed:
                await anyio.sleep(0.01)
        assert slot.active is old
        assert not loads.engines[0].closed
