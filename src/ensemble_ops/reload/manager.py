"""Starts, tracks and reports the reloads of a set of members (the Python API and the routes).

One machine (``machine.new_machine``) holds every member's job. Loads share one limiter
(``reload.max_concurrent_loads``) with start-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread
import structlog
from opentelemetry.trace import NoOpTracer, Status, StatusCode, Tracer

from ensemble_ops.config import (
    GoldenSetError,
    ModelSpec,
    QualitySettings,
    QualityThresholds,
    ReloadSettings,
    RolloutSpec,
    Settings,
    load_golden_set,
)
from ensemble_ops.errors import InvalidModelFileError, InvalidRequestError, ReloadConflictError
from ensemble_ops.events import (
    ROLLING_STATES,
    DrainTimedOut,
    EventBus,
    ModelUnloaded,
    QualitySkipped,
    ReloadFinished,
    RolloutFinished,
)
from ensemble_ops.quality.gate import QualityGate, QualityPlan
from ensemble_ops.reload.machine import LoaderFunc, Plan, ReloadJob, new_machine
from ensemble_ops.reload.memory import available_memory, release_memory
from ensemble_ops.reload.rollout import Decision
from ensemble_ops.reload.status import RUNNING, ReloadStatus
from ensemble_ops.reload.warmup import WarmupFunc, chat_warmup
from ensemble_ops.serving.engine import Engine
from ensemble_ops.serving.gguf_check import inspect_gguf
from ensemble_ops.serving.gpu import GpuMonitor
from ensemble_ops.serving.slot import Loaded, ModelSlot, loaded_event
from ensemble_ops.tasks import TaskRunner

__all__ = ["MemoryProbe", "ReloadManager"]

_log = structlog.get_logger("ensemble_ops.reload")

MemoryProbe = Callable[[ModelSpec], tuple[int, str]]
"""Free bytes where ``spec`` would load, and which memory that is ("RAM" or "VRAM")."""


class ReloadManager:
    """Starts, tracks and reports reloads of a set of members."""

    def __init__(
        self,
        bus: EventBus,
        slots: Mapping[str, ModelSlot],
        settings: ReloadSettings,
        runner: TaskRunner,
        *,
        loader: Callable[[ModelSpec], Engine],
        gpu: GpuMonitor,
        load_limiter: anyio.CapacityLimiter | None = None,
        memory_probe: MemoryProbe | None = None,
        allowed_dirs: list[Path] | None = None,
        tracer: Tracer | None = None,
        identify: Callable[[ModelSpec], str | None] = lambda spec: None,
        quality: QualitySettings | None = None,
    ) -> None:
        """``slots`` is read live; ``loader`` loads a member's engine from its spec; ``gpu``
        reads free VRAM for the memory check (``memory_probe`` replaces that check);
        ``allowed_dirs`` bounds reload paths (default: the folders of the members' files);
        ``tracer`` makes a trace of each reload, a span per state; ``identify`` names what a
        copy loaded from a spec answers like, for the response cache (blocking: it may hash
        the file); ``quality`` names the golden set new copies must pass (default: none)."""
        self.bus = bus
        self.slots = slots
        self.settings = settings
        self.runner = runner
        self.loader = loader
        self.identify = identify
        self.load_limiter = load_limiter or anyio.CapacityLimiter(settings.max_concurrent_loads)
        self._gpu = gpu
        self._memory_probe = memory_probe
        self.allowed_dirs = allowed_dirs
        self.tracer = tracer or NoOpTracer()
        self.quality = quality or QualitySettings()
        self.quality_gate = QualityGate(bus)
        self._jobs: dict[str, ReloadJob] = {}
        self._machine = new_machine()

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
        rollout: RolloutSpec | None = None,
        allow_capability_change: bool = False,
        quality: QualityThresholds | Literal[False] | None = None,
    ) -> ReloadStatus:
        """Start reloading ``model_name`` in the background and return its status at once.

        By default the member's GGUF file (or ``path``, which must lie inside the model
        directory) is loaded with the member's settings and warmed up with its warm-up
        prompt; ``loader_func``/``warmup_func`` replace either step. ``rollout`` says how the
        new copy takes over (default ``[reload.rollout]``: a switch). A new copy that cannot
        do what the member's copy can (chat) fails at warm-up unless
        ``allow_capability_change``. With a golden set configured the new copy must pass it
        first (``quality`` overrides the thresholds, or False skips the gate). Raises
        :class:`ReloadConflictError` while one runs, :class:`InvalidRequestError` for a
        rollout the member cannot hold or a golden set that no longer parses.
        """
        job = self._job(model_name)
        if job.pending:
            status = job.status()
            raise ReloadConflictError(model_name, status.state, status.progress_percent)
        rollout = rollout or self.settings.rollout
        if rollout.kind != "switch" and job.slot.spec.reload_strategy == "replace":
            raise InvalidRequestError(
                f'{model_name!r} has reload_strategy = "replace", which never holds two '
                f"copies: its reloads can only switch, not {rollout.kind}",
                param="rollout",
            )
        current = spec or job.slot.spec
        if path is not None:
            current = current.model_copy(update={"path": self.resolve_path(path)})
        settings = self.settings
        golden = self.quality.golden_set_for(current.quality)
        quality_plan = None
        if golden is not None and quality is not False:
            try:  # read again: an edited file counts from this reload on
                golden_set = load_golden_set(golden)
            except GoldenSetError as err:
                raise InvalidRequestError(str(err), param="quality") from err
            quality_plan = QualityPlan.of(golden_set, quality, current.quality, self.quality)
        job.begin(
            Plan(
                spec=current,
                loader=loader_func or (lambda: self.loader(current)),
                # A caller's own loader may load anything: its copy's answers are not cached.
                identify=(lambda: None) if loader_func else (lambda: self.identify(current)),
                warmup=warmup_func
                or chat_warmup(
                    current.warmup_prompt or settings.warmup_prompt, settings.warmup_max_tokens
                ),
                iterations=(
                    warmup_iterations or current.warmup_iterations or settings.warmup_iterations
                ),
                rollout=rollout,
                allow_capability_change=allow_capability_change,
                quality=quality_plan,
            )
        )
        try:
            self.runner.spawn(self._drive, job)
        except BaseException:
            job.finish()
            raise
        if golden is not None and quality is False:
            self.bus.publish(QualitySkipped(model_name, golden.name))
        return job.status()

    async def reload_model(
        self,
        model_name: str,
        loader_func: LoaderFunc | None = None,
        warmup_func: WarmupFunc | None = None,
        warmup_iterations: int | None = None,
        *,
        path: Path | str | None = None,
        rollout: RolloutSpec | None = None,
        allow_capability_change: bool = False,
        quality: QualityThresholds | Literal[False] | None = None,
    ) -> ReloadStatus:
        """Reload ``model_name`` and wait for the outcome (completed, failed or
        rolled_back)."""
        self.start_reload(
            model_name,
            loader_func,
            warmup_func,
            warmup_iterations,
            path=path,
            rollout=rollout,
            allow_capability_change=allow_capability_change,
            quality=quality,
        )
        return await self.wait_for_reload(model_name)

    def promote(self, model_name: str) -> ReloadStatus:
        """Give the new copy of a running rollout all traffic now (blue-green's promote; it
        also ends a canary or shadow early). Raises :class:`InvalidRequestError` when no
        rollout of the member is running."""
        return self._decide(model_name, "promote")

    def abort(self, model_name: str) -> ReloadStatus:
        """Roll a running rollout back now: the old copy keeps serving."""
        return self._decide(model_name, "abort")

    def _decide(self, model_name: str, decision: Decision) -> ReloadStatus:
        job = self._job(model_name)
        live = job.live
        if live is None or job.state not in ROLLING_STATES:
            raise InvalidRequestError(
                f"No rollout of {model_name!r} is running to {decision} "
                f"(reload state: {job.status().state}).",
                param="model",
            )
        live.decide(decision)
        return job.status()

    async def wait_for_reload(self, model_name: str) -> ReloadStatus:
        """The status once the member's current reload (if any) has ended."""
        job = self._job(model_name)
        await job.wait()
        return job.status()

    def apply_settings(self, new: Settings) -> dict[str, str]:
        """Reload every member whose spec changed in ``new`` (SIGHUP); name -> what happened.
        ``[quality]`` applies from the reloads started here on."""
        self.quality = new.quality
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
        if "\x00" in str(raw):  # the OS refuses such a path; say so as a client error
            raise InvalidRequestError("The path must not contain a NUL character.", param="path")
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

    # -- what jobs need (machine.Host) ---------------------------------------------------------

    def available_memory(self, spec: ModelSpec) -> tuple[int, str]:
        if self._memory_probe is not None:
            return self._memory_probe(spec)
        return available_memory(spec, self._gpu)

    async def retire(self, old: Loaded, *, wait: bool) -> bool:
        """Close ``old`` once its last lease ends. Returns whether that happened in time;
        if not (drain_timeout_s), it is reported and the close finishes in the background."""
        drained = await old.wait_idle(self.settings.drain_timeout_s)
        if not drained:
            self.bus.publish(DrainTimedOut(old.name, old.generation, old.in_flight))
            if not wait:
                self.runner.spawn(self._close_when_idle, old)
                return False
            await old.wait_idle(float("inf"))
        await self._close(old)
        return True

    async def restore(self, slot: ModelSlot, spec: ModelSpec) -> None:
        """After a failed ``replace`` reload: load the previous copy again (best effort)."""
        try:
            engine = await anyio.to_thread.run_sync(self.loader, spec, limiter=self.load_limiter)
        except Exception as err:
            slot.mark_failed(f"reload failed and the previous copy did not load again: {err}")
            _log.error("reload.restore_failed", model=slot.name, error=str(err))
            return
        try:
            identity = await anyio.to_thread.run_sync(self.identify, spec)
        except OSError:
            identity = None  # it loaded, so it serves; its answers go uncached
        self.bus.publish(loaded_event(slot.install(engine, identity), 0.0))

    # -- running -----------------------------------------------------------------------------

    async def _drive(self, job: ReloadJob) -> None:
        started = time.monotonic()
        try:
            with self.tracer.start_as_current_span(
                f"reload {job.name}", attributes={"ensemble_ops.model": job.name}
            ) as span:
                await job.start()  # runs the whole chain: each state fires the next trigger
                if job.state in RUNNING:  # a shutdown cancelled it (transitions returns then)
                    with anyio.CancelScope(shield=True):
                        await job.abandon()
                span.set_attribute("ensemble_ops.reload.outcome", job.state)
                if job.state != "completed":
                    span.set_status(Status(StatusCode.ERROR, job.error or "failed"))
            elapsed = time.monotonic() - started
            kind = job.rollout_kind
            if job.state == "completed":
                self.bus.publish(ReloadFinished(job.name, "completed", elapsed))
                self.bus.publish(RolloutFinished(job.name, kind, "promoted"))
            elif job.state == "rolled_back":
                self.bus.publish(ReloadFinished(job.name, "rolled_back", elapsed, job.error))
                self.bus.publish(RolloutFinished(job.name, kind, "rolled_back", job.error))
            else:
                self.bus.publish(ReloadFinished(job.name, "failed", elapsed, job.error))
                self.bus.publish(RolloutFinished(job.name, kind, "failed", job.error))
        finally:
            job.finish()

    async def _close_when_idle(self, old: Loaded) -> None:
        await old.wait_idle(float("inf"))
        await self._close(old)

    async def _close(self, old: Loaded) -> None:
        await old.close()
        await anyio.to_thread.run_sync(release_memory)
        self.bus.publish(ModelUnloaded(old.name, old.generation))

    def _job(self, name: str) -> ReloadJob:
        job = self._jobs.get(name)
        if job is None:
            job = self._jobs[name] = ReloadJob(self, self.slots[name])
            self._machine.add_model(job)
        return job
