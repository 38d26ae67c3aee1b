"""Zero-downtime reload: a ``transitions`` state machine per member, with rollback.

::

    idle | completed | failed --start--> warming_up --warmed--> ready --switch--> switching
    switching --complete--> completed        warming_up | ready | switching --fail--> failed

warming_up validates the file, checks memory for a second copy, loads it in a worker thread
(10%) and runs N warm-up inferences (30 -> 80%). switching swaps the slot's reference in one
assignment (90%): new requests go to the new copy from that moment, requests already running
finish on the old one, which is closed when its last lease ends (100%). Any failure before the
swap leaves the old copy serving, closes the new one and ends in failed.

One machine holds every member's job with ``queued="model"``: each member's triggers are
queued, and reloads of different members may overlap (``queued=True`` would make one queue
for all). Loads share one limiter (``reload.max_concurrent_loads``) with start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import gc
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
import psutil
import structlog
from transitions.extensions.asyncio import AsyncMachine

from .config import ModelSpec, ReloadSettings, Settings
from .engine import ChatMessage, Completion, Engine, GenerationParams
from .errors import EnsembleOpsError, InvalidModelFileError, InvalidRequestError
from .events import (
    DrainTimedOut,
    EventBus,
    ModelUnloaded,
    ReloadFinished,
    ReloadProgressed,
    ReloadStateChanged,
)
from .gguf_file import inspect_gguf
from .gpu import GpuMonitor
from .slot import Loaded, ModelSlot, loaded_event

__all__ = [
    "STATES",
    "TRANSITIONS",
    "ReloadConflictError",
    "ReloadManager",
    "ReloadStatus",
    "get_reload_manager",
    "reload_model",
]

_log = structlog.get_logger("ensemble_ops.reload")

STATES = ["idle", "warming_up", "ready", "switching", "completed", "failed"]
TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "start", "source": ["idle", "completed", "failed"], "dest": "warming_up"},
    {"trigger": "warmed", "source": "warming_up", "dest": "ready"},
    {"trigger": "switch", "source": "ready", "dest": "switching"},
    {"trigger": "complete", "source": "switching", "dest": "completed"},
    {"trigger": "fail", "source": ["warming_up", "ready", "switching"], "dest": "failed"},
]
RUNNING = frozenset({"warming_up", "ready", "switching"})

LoaderFunc = Callable[[], Engine]
"""Loads the new copy (blocking; runs in a worker thread)."""
WarmupFunc = Callable[[Engine], object]
"""One warm-up inference on the new copy (blocking); a falsy result fails the reload."""
MemoryProbe = Callable[[ModelSpec], tuple[int, str]]
"""Free bytes where ``spec`` would load, and which memory that is ("RAM" or "VRAM")."""


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ReloadStatus:
    """What ``GET /health/llm/reload/{model}`` returns."""

    model: str
    state: str
    progress_percent: float
    message: str
    started_at: str | None
    completed_at: str | None
    error: str | None

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "state": self.state,
            "progress_percent": self.progress_percent,
            "message": self.message,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "error": self.error,
        }


class ReloadConflictError(EnsembleOpsError):
    """A reload is already running for this member (HTTP 409)."""

    def __init__(self, status: ReloadStatus) -> None:
        self.status = status
        super().__init__(
            f"A reload of {status.model!r} is already running "
            f"({status.state}, {status.progress_percent:.0f}%)."
        )


class _ReloadFailedError(Exception):
    """Why a reload failed; its message is the status's ``error``."""


@dataclass
class _Plan:
    spec: ModelSpec
    loader: LoaderFunc
    warmup: WarmupFunc
    iterations: int


def _guarded(
    work: Callable[[_Job], Awaitable[None]],
) -> Callable[[_Job], Awaitable[None]]:
    """Keep a state's failure on the job instead of raising it through transitions, which
    would log it as an error; the driver then triggers ``fail``."""

    @functools.wraps(work)
    async def run(job: _Job) -> None:
        try:
            await work(job)
        except Exception as err:
            job.failure = err

    return run


def _returned_nothing(result: object) -> bool:
    if isinstance(result, Completion):
        return result.completion_tokens == 0 and not result.text
    return not result


class _Job:
    """One member's reload: the model object of the state machine."""

    state: str  # set by the machine
    if TYPE_CHECKING:  # triggers the machine adds (declared, not defined: it would skip them)
        start: Callable[[], Awaitable[bool]]
        warmed: Callable[[], Awaitable[bool]]
        switch: Callable[[], Awaitable[bool]]
        complete: Callable[[], Awaitable[bool]]
        fail: Callable[[], Awaitable[bool]]

    def __init__(self, manager: ReloadManager, slot: ModelSlot) -> None:
        self.manager = manager
        self.slot = slot
        self.progress = 0.0
        self.message = "No reload has run yet."
        self.started_at: float | None = None
        self.completed_at: float | None = None
        self.error: str | None = None
        self.pending = False  # set at once by start_reload, before the task runs
        self.failure: Exception | None = None
        self.plan: _Plan | None = None
        self.new: Loaded | None = None
        self.replaced: ModelSpec | None = None  # set when reload_strategy=replace unloaded it
        self._last_state = "idle"
        self._started_mono = 0.0
        self.load_s = 0.0
        self.done = anyio.Event()

    @property
    def name(self) -> str:
        return self.slot.name

    def status(self) -> ReloadStatus:
        state = "warming_up" if self.pending and self.state not in RUNNING else self.state
        return ReloadStatus(
            self.name,
            state,
            round(self.progress, 1),
            self.message,
            _iso(self.started_at),
            _iso(self.completed_at),
            self.error,
        )

    def _progress(self, percent: float, message: str) -> None:
        self.progress, self.message = percent, message
        self.manager.bus.publish(ReloadProgressed(self.name, self.state, percent, message))

    def _entered(self, percent: float, message: str) -> None:
        self.progress, self.message = percent, message
        previous, self._last_state = self._last_state, self.state
        elapsed = time.monotonic() - self._started_mono
        self.manager.bus.publish(
            ReloadStateChanged(self.name, previous, self.state, percent, message, elapsed)
        )

    # -- the states' work --------------------------------------------------------------------

    @_guarded
    async def on_enter_warming_up(self) -> None:
        plan = self.plan
        assert plan is not None
        manager = self.manager
        self._entered(0.0, f"Checking {plan.spec.path.name}")
        try:
            await anyio.to_thread.run_sync(inspect_gguf, plan.spec.path)
        except InvalidModelFileError as err:
            raise _ReloadFailedError(err.reason) from err
        await self._make_room(plan.spec)
        self._progress(5.0, f"Loading {plan.spec.path.name}")
        started = time.perf_counter()
        try:
            engine = await anyio.to_thread.run_sync(plan.loader, limiter=manager.load_limiter)
        except Exception as err:
            raise _ReloadFailedError(f"load failed: {err}") from err
        self.new = Loaded(self.name, engine)
        self.load_s = time.perf_counter() - started
        self._progress(10.0, "Loaded; warming up")
        for i in range(1, plan.iterations + 1):
            self._progress(
                30.0 + 50.0 * (i - 1) / plan.iterations,
                f"Warmup iteration {i}/{plan.iterations}",
            )
            await self._warm_once(i, plan)
        self._progress(80.0, f"Warm-up passed ({plan.iterations} iterations)")

    async def _warm_once(self, i: int, plan: _Plan) -> None:
        new = self.new
        assert new is not None
        timeout = self.manager.settings.warmup_timeout_s
        done = anyio.Event()
        outcome: dict[str, Any] = {}

        async def run() -> None:
            try:
                outcome["result"] = await new.run(plan.warmup, new.engine)
            except Exception as err:
                outcome["error"] = err
            finally:
                done.set()

        # A task of its own: a warm-up that hangs is given up on after the timeout while its
        # thread finishes in the background (the copy is closed only after it returns).
        self.manager.spawn(run)
        with anyio.move_on_after(timeout):
            await done.wait()
        if not done.is_set():
            raise _ReloadFailedError(f"warm-up iteration {i} timed out after {timeout:g} s")
        if "error" in outcome:
            raise _ReloadFailedError(f"warm-up iteration {i} failed: {outcome['error']}")
        if _returned_nothing(outcome["result"]):
            raise _ReloadFailedError(f"warm-up iteration {i} returned nothing")

    async def _make_room(self, spec: ModelSpec) -> None:
        """Fail fast without memory for a second copy, or unload first (replace)."""
        manager = self.manager
        active = self.slot.active
        if active is None:
            return  # nothing loaded: the new copy is the only one
        need = int(
            (spec.path.stat().st_size + active.engine.info.context_bytes)
            * manager.settings.memory_headroom
        )
        free, kind = manager.available_memory(spec)
        if free >= need:
            return
        shortage = (
            f"not enough {kind} for a second copy: need {need / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free"
        )
        if spec.reload_strategy != "replace":
            raise _ReloadFailedError(
                shortage + ' (reload_strategy = "replace" would unload the old copy first)'
            )
        self._progress(2.0, f"{shortage}: unloading the old copy first (replace)")
        old = self.slot.swap(None)
        self.slot.state = "reloading"
        self.replaced = self.slot.spec
        if old is not None:
            await manager.retire(old, wait=True)

    async def on_enter_ready(self) -> None:
        self._entered(80.0, "Warm-up passed; switching")

    @_guarded
    async def on_enter_switching(self) -> None:
        plan, new = self.plan, self.new
        assert plan is not None
        assert new is not None
        self._entered(80.0, "Switching to the new copy")
        old = self.slot.swap(new)  # one assignment: from here new requests use the new copy
        self.slot.spec = plan.spec
        self.new, self.replaced = None, None
        self.manager.bus.publish(loaded_event(new, self.load_s))
        if old is None:
            self._progress(100.0, f"Serving generation {new.generation}")
            return
        self._progress(
            90.0,
            f"Serving generation {new.generation}; draining {old.in_flight} request(s) "
            "on the old copy",
        )
        drained = await self.manager.retire(old, wait=False)
        self._progress(
            100.0,
            f"Serving generation {new.generation}; old copy closed"
            if drained
            else f"Serving generation {new.generation}; old copy closes when its "
            f"{old.in_flight} request(s) end",
        )

    async def on_enter_completed(self) -> None:
        self.completed_at = time.time()
        self._entered(100.0, self.message)

    async def on_enter_failed(self) -> None:
        self.completed_at = time.time()
        reason = self.error or "unknown error"
        if self.new is not None:  # roll back: the new copy goes, the old one stays
            new, self.new = self.new, None
            self.manager.spawn(new.close)
        if self.replaced is not None:  # replace had unloaded the old copy: bring it back
            self.manager.spawn(self.manager.restore, self.slot, self.replaced)
            self.replaced = None
        self._entered(0.0, f"Reload failed: {reason}")


class ReloadManager:
    """Starts, tracks and reports reloads of a set of members."""

    def __init__(
        self,
        bus: EventBus,
        slots: Mapping[str, ModelSlot],
        settings: ReloadSettings,
        *,
        loader: Callable[[ModelSpec], Engine] | None = None,
        load_limiter: anyio.CapacityLimiter | None = None,
        available_memory: MemoryProbe | None = None,
        allowed_dirs: list[Path] | None = None,
    ) -> None:
        from .engine import LlamaEngine

        self.bus = bus
        self.slots = slots
        self.settings = settings
        self.loader = loader or LlamaEngine.load
        self.load_limiter = load_limiter or anyio.CapacityLimiter(settings.max_concurrent_loads)
        self.available_memory = available_memory or _available_memory
        self.allowed_dirs = allowed_dirs
        self.tasks: anyio.abc.TaskGroup | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._jobs: dict[str, _Job] = {}
        self._machine = AsyncMachine(
            model=None,
            states=STATES,
            transitions=TRANSITIONS,
            initial="idle",
            queued="model",
            auto_transitions=False,
        )

    # -- the Python API ----------------------------------------------------------------------

    def get_reload_status(self, model_name: str) -> ReloadStatus:
        """The member's reload status (``idle`` before any reload); KeyError if unknown."""
        return self._job(model_name).status()

    def get_active_model(self, model_name: str) -> Engine | None:
        """The engine serving ``model_name`` right now (None while none is loaded)."""
        active = self.slots[model_name].active
        return active.engine if active is not None else None

    def start_reload(
        self,
        model_name: str,
        loader_func: LoaderFunc | None = None,
        warmup_func: WarmupFunc | None = None,
        warmup_iterations: int | None = None,
        *,
        path: Path | str | None = None,
        spec: ModelSpec | None = None,
    ) -> ReloadStatus:
        """Start reloading ``model_name`` in the background and return its status at once.

        By default the member's GGUF file (or ``path``, which must lie inside the model
        directory) is loaded with the member's settings and warmed up with its warm-up
        prompt; ``loader_func``/``warmup_func`` replace either step.
        """
        job = self._job(model_name)
        if job.pending:
            raise ReloadConflictError(job.status())
        current = spec or job.slot.spec
        if path is not None:
            current = current.model_copy(update={"path": self.resolve_path(path)})
        iterations = (
            warmup_iterations or current.warmup_iterations or self.settings.warmup_iterations
        )
        job.plan = _Plan(
            spec=current,
            loader=loader_func or (lambda: self.loader(current)),
            warmup=warmup_func or self._default_warmup(current),
            iterations=iterations,
        )
        job.done = anyio.Event()
        job.started_at, job.completed_at, job.error = time.time(), None, None
        job.progress, job.message = 0.0, "Reload queued"
        job._started_mono = time.monotonic()
        job.pending = True
        try:
            self.spawn(self._drive, job)
        except BaseException:
            job.pending = False
            raise
        return job.status()

    async def reload_model(
        self,
        model_name: str,
        loader_func: LoaderFunc | None = None,
        warmup_func: WarmupFunc | None = None,
        warmup_iterations: int | None = None,
        *,
        path: Path | str | None = None,
    ) -> ReloadStatus:
        """Reload ``model_name`` and wait for the outcome (completed or failed)."""
        self.start_reload(model_name, loader_func, warmup_func, warmup_iterations, path=path)
        job = self._job(model_name)
        await job.done.wait()
        return job.status()

    def apply_settings(self, new: Settings) -> dict[str, str]:
        """Reload every member whose spec changed in ``new`` (SIGHUP); name -> what happened."""
        outcome: dict[str, str] = {}
        new_specs = {spec.name: spec for spec in new.models}
        for name, slot in self.slots.items():
            spec = new_specs.get(name)
            if spec is None:
                outcome[name] = "removed from the config: restart to drop it"
            elif spec != slot.spec:
                try:
                    self.start_reload(name, spec=spec)
                    outcome[name] = "reloading"
                except ReloadConflictError:
                    outcome[name] = "a reload is already running"
        for name in new_specs.keys() - self.slots.keys():
            outcome[name] = "added to the config: restart to load it"
        return outcome

    def resolve_path(self, raw: Path | str) -> Path:
        """``raw`` resolved (symlinks too) and checked to lie inside the model directory."""
        allowed = self.allowed_dirs or sorted(
            {slot.spec.path.resolve().parent for slot in self.slots.values()}
        )
        path = Path(raw)
        if not path.is_absolute():
            path = allowed[0] / path
        resolved = path.resolve()
        if not any(resolved.is_relative_to(d.resolve()) for d in allowed):
            raise InvalidRequestError(
                f"The path {str(raw)!r} is outside the model directory.", param="path"
            )
        if not resolved.is_file():
            raise InvalidRequestError(f"No GGUF file at {str(raw)!r}.", param="path")
        try:
            inspect_gguf(resolved)
        except InvalidModelFileError as err:
            raise InvalidRequestError(f"{str(raw)!r}: {err.reason}.", param="path") from err
        return resolved

    # -- running ---------------------------------------------------------------------------------

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func`` in the app's task group, or as a loop task when embedded."""
        if self.tasks is not None:
            self.tasks.start_soon(func, *args)
            return
        task = asyncio.get_running_loop().create_task(func(*args))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drive(self, job: _Job) -> None:
        started = time.monotonic()
        job.failure = None
        try:
            for step in (job.start, job.warmed, job.switch, job.complete):
                await step()
                if job.failure is not None:
                    break
            if job.failure is not None:
                err = job.failure
                expected = isinstance(err, _ReloadFailedError)
                job.error = str(err) if expected else f"{type(err).__name__}: {err}"
                await job.fail()
                self.bus.publish(
                    ReloadFinished(job.name, "failed", time.monotonic() - started, job.error)
                )
            else:
                self.bus.publish(ReloadFinished(job.name, "completed", time.monotonic() - started))
        finally:
            job.pending = False
            job.done.set()

    async def retire(self, old: Loaded, *, wait: bool) -> bool:
        """Close ``old`` once its last lease ends. Returns whether that happened in time;
        if not (drain_timeout_s), it is reported and the close finishes in the background."""
        drained = await old.wait_idle(self.settings.drain_timeout_s)
        if not drained:
            self.bus.publish(DrainTimedOut(old.name, old.generation, old.in_flight))
            if not wait:
                self.spawn(self._close_when_idle, old)
                return False
            await old.wait_idle(float("inf"))
        await self._close(old)
        return True

    async def _close_when_idle(self, old: Loaded) -> None:
        await old.wait_idle(float("inf"))
        await self._close(old)

    async def _close(self, old: Loaded) -> None:
        await old.close()
        await anyio.to_thread.run_sync(_release_memory)
        self.bus.publish(ModelUnloaded(old.name, old.generation))

    async def restore(self, slot: ModelSlot, spec: ModelSpec) -> None:
        """After a failed ``replace`` reload: load the previous copy again (best effort)."""
        try:
            engine = await anyio.to_thread.run_sync(self.loader, spec, limiter=self.load_limiter)
        except Exception as err:
            slot.mark_failed(f"reload failed and the previous copy did not load again: {err}")
            _log.error("reload.restore_failed", model=slot.name, error=str(err))
            return
        self.bus.publish(loaded_event(slot.install(engine), 0.0))

    def _job(self, name: str) -> _Job:
        job = self._jobs.get(name)
        if job is None:
            job = self._jobs[name] = _Job(self, self.slots[name])
            self._machine.add_model(job)
        return job

    def _default_warmup(self, spec: ModelSpec) -> WarmupFunc:
        prompt = spec.warmup_prompt or self.settings.warmup_prompt
        # Temperature 0: a copy either answers or it does not, never by chance (an instruct
        # model may end a sampled reply at once, which would fail a good copy now and then).
        params = GenerationParams(
            max_tokens=self.settings.warmup_max_tokens, temperature=0.0, top_p=1.0
        )

        def warm(engine: Engine) -> Completion:
            # Through the chat template, as users reach it: an instruct model given the bare
            # text may rightly answer with end-of-sequence only.
            chat = engine.render_chat([ChatMessage("user", prompt)])
            return engine.complete(chat.tokens, dataclasses.replace(params, stop=chat.stop))

        return warm


def _release_memory() -> None:
    """Give a closed model's memory back to the system, not just to the allocator.

    gc.collect drops llama-cpp-python's reference cycles at once. glibc keeps freed heap
    pages for reuse, so without malloc_trim RSS grows with each reload until fragmentation
    plateaus (measured: +47 MiB over 30 reloads of a 71 MB model; flat with the trim).
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_gpu: GpuMonitor | None = None


def _available_memory(spec: ModelSpec) -> tuple[int, str]:
    """Free VRAM for a member on the GPU (NVML), free RAM otherwise (psutil)."""
    global _gpu
    if spec.n_gpu_layers != 0:
        _gpu = _gpu or GpuMonitor()
        free = _gpu.free_memory()
        if free is not None:
            return free, "VRAM"
    return psutil.virtual_memory().available, "RAM"


def mermaid_diagram() -> str:
    """The machine drawn by transitions itself, as Mermaid (docs/reload.md embeds it)."""
    from transitions.extensions import GraphMachine

    class _Drawing:
        pass

    drawing = _Drawing()
    GraphMachine(
        model=drawing,
        states=STATES,
        transitions=TRANSITIONS,
        initial="idle",
        graph_engine="mermaid",
        auto_transitions=False,
        title="Reload state machine",
    )
    graph: Any = drawing.get_graph()  # type: ignore[attr-defined]
    return str(graph.draw(None))


_default: ReloadManager | None = None


def get_reload_manager() -> ReloadManager:
    """The process-wide manager for models registered with ``get_health_checker()``.

    The server's own manager is ``app.state.reload``; this one is for embedding.
    """
    global _default
    if _default is None:
        from .embedded import default_bus, default_slots

        _default = ReloadManager(default_bus(), default_slots(), ReloadSettings())
    return _default


async def reload_model(
    model_name: str,
    loader_func: LoaderFunc | None = None,
    warmup_func: WarmupFunc | None = None,
    warmup_iterations: int = 5,
) -> ReloadStatus:
    """Reload a member of the process-wide manager and wait for the outcome."""
    return await get_reload_manager().reload_model(
        model_name, loader_func, warmup_func, warmup_iterations
    )
