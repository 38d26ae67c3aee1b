"""Tri-state model health: healthy, degraded or unhealthy, with the figures to act on.

``HealthView`` is a view: it learns everything from events (loads, inferences, probes) and
publishes ``HealthChanged`` when a member's status changes. ``HealthChecker`` answers health
questions: it adds memory readings (llama.cpp's sizes, psutil, NVML) and runs inference
probes that cannot hurt the service (own timeout, never queued behind user traffic, cached).

Status rules (thresholds in ``[health]``):

- unknown: still loading;
- unhealthy: not loaded, the inference probe failed, or the last ``failure_threshold``
  inferences failed;
- degraded: llama.cpp memory over ``memory_limit_bytes``, or the last inference slower than
  ``latency_limit_s``;
- healthy otherwise. One successful inference (or probe) makes an unhealthy member recover.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psutil
import structlog

from .config import HealthSettings, ModelSpec
from .engine import Engine, GenerationParams
from .events import (
    EventBus,
    HealthChanged,
    InferenceFailed,
    InferenceFinished,
    ModelLoaded,
    ModelLoadFailed,
    ModelUnloaded,
    ProbeFinished,
    ReloadProgressed,
    ReloadStateChanged,
)
from .gpu import GpuMonitor
from .slot import Loaded, ModelSlot, loaded_event

__all__ = [
    "HealthChecker",
    "HealthStatus",
    "HealthView",
    "ModelHealth",
    "Probe",
    "check_liveness",
    "check_readiness",
    "get_health_checker",
]

_log = structlog.get_logger("ensemble_ops.health")
_MIB = 2**20


class HealthStatus(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"

    @property
    def serving(self) -> bool:
        """Healthy and degraded members serve; the others do not."""
        return self in (HealthStatus.HEALTHY, HealthStatus.DEGRADED)


@dataclass(frozen=True)
class Probe:
    """What ``run_inference=true`` found: ran now, came from the cache, or skipped as busy."""

    outcome: str  # "ok", "failed", "timeout", "busy", "not_loaded"
    latency_ms: float | None
    cached: bool
    error: str | None = None
    at: float = 0.0  # monotonic
    generation: int = 0


@dataclass(frozen=True)
class ModelHealth:
    """One member's health, as ``GET /health/llm`` returns it (``probe`` only when asked)."""

    model_name: str
    status: HealthStatus
    loaded: bool
    inference_ready: bool
    last_inference_ms: float | None
    memory_mb: float | None
    gpu_memory_mb: float | None
    error_message: str | None
    checked_at: str
    uptime_seconds: float | None
    probe: Probe | None = None
    reload: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model_name": self.model_name,
            "status": self.status.value,
            "loaded": self.loaded,
            "inference_ready": self.inference_ready,
            "last_inference_ms": self.last_inference_ms,
            "memory_mb": self.memory_mb,
            "gpu_memory_mb": self.gpu_memory_mb,
            "error_message": self.error_message,
            "checked_at": self.checked_at,
            "uptime_seconds": self.uptime_seconds,
        }
        if self.reload is not None:
            body["reload"] = self.reload
        if self.probe is not None:
            body["probe"] = {
                "outcome": self.probe.outcome,
                "latency_ms": self.probe.latency_ms,
                "cached": self.probe.cached,
                "error": self.probe.error,
            }
        return body


def utc_now() -> str:
    """ISO-8601 UTC with a ``Z``, as every ``checked_at``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Record:
    """What the view knows of one member, from events only."""

    loading: bool = True
    generation: int = 0
    loaded_at: float | None = None  # monotonic
    memory_bytes: int = 0
    gpu_bytes: int = 0
    load_error: str | None = None
    last_inference_s: float | None = None
    failures: int = 0
    last_error: str | None = None
    probe_error: str | None = None
    status: HealthStatus = HealthStatus.UNKNOWN
    reason: str = "loading"
    reload: dict[str, Any] | None = None


class HealthView:
    """Per-member health records kept from events; publishes ``HealthChanged``."""

    def __init__(self, bus: EventBus, settings: HealthSettings, members: list[str]) -> None:
        self._bus = bus
        self._settings = settings
        self._records = {name: _Record() for name in members}
        bus.subscribe(ModelLoaded, self._on_loaded)
        bus.subscribe(ModelLoadFailed, self._on_load_failed)
        bus.subscribe(ModelUnloaded, self._on_unloaded)
        bus.subscribe(InferenceFinished, self._on_finished)
        bus.subscribe(InferenceFailed, self._on_failed)
        bus.subscribe(ProbeFinished, self._on_probe)
        bus.subscribe(ReloadStateChanged, self._on_reload)
        bus.subscribe(ReloadProgressed, self._on_reload)

    def add(self, name: str) -> None:
        self._records.setdefault(name, _Record())

    def record(self, name: str) -> _Record:
        return self._records[name]

    def status(self, name: str) -> HealthStatus:
        record = self._records.get(name)
        return record.status if record is not None else HealthStatus.UNKNOWN

    def can_serve(self, name: str) -> bool:
        """For routing: False only for members known to be unhealthy."""
        return self.status(name) != HealthStatus.UNHEALTHY

    def evaluate(self, name: str) -> tuple[HealthStatus, str]:
        r, limits = self._records[name], self._settings
        if r.loaded_at is None:
            if r.loading:
                return HealthStatus.UNKNOWN, "the model is still loading"
            return HealthStatus.UNHEALTHY, r.load_error or "the model is not loaded"
        if r.probe_error is not None:
            return HealthStatus.UNHEALTHY, f"inference probe failed: {r.probe_error}"
        if r.failures >= limits.failure_threshold:
            return (
                HealthStatus.UNHEALTHY,
                f"{r.failures} inferences failed in a row: {r.last_error}",
            )
        if r.memory_bytes > limits.memory_limit_bytes:
            return HealthStatus.DEGRADED, (
                f"memory {r.memory_bytes / _MIB:.0f} MiB is over the limit of "
                f"{limits.memory_limit_bytes / _MIB:.0f} MiB"
            )
        if r.last_inference_s is not None and r.last_inference_s > limits.latency_limit_s:
            return HealthStatus.DEGRADED, (
                f"last inference took {r.last_inference_s:.2f} s "
                f"(limit {limits.latency_limit_s:g} s)"
            )
        return HealthStatus.HEALTHY, "ok"

    def refresh(self, name: str) -> None:
        """Re-evaluate ``name`` and publish ``HealthChanged`` if its status moved."""
        record = self._records[name]
        status, reason = self.evaluate(name)
        old = record.status
        record.reason = reason
        if status != old:
            record.status = status
            self._bus.publish(HealthChanged(name, old.value, status.value, reason))

    # -- events --------------------------------------------------------------------------------

    def _on_loaded(self, event: ModelLoaded) -> None:
        self.add(event.model)
        r = self._records[event.model]
        r.loading, r.generation, r.loaded_at = False, event.generation, time.monotonic()
        r.memory_bytes = event.weights_bytes + event.context_bytes
        r.gpu_bytes = event.gpu_bytes
        r.load_error = r.probe_error = r.last_error = None
        r.failures = 0
        self.refresh(event.model)

    def _on_load_failed(self, event: ModelLoadFailed) -> None:
        self.add(event.model)
        r = self._records[event.model]
        r.loading, r.load_error = False, event.error
        self.refresh(event.model)

    def _on_unloaded(self, event: ModelUnloaded) -> None:
        r = self._records.get(event.model)
        if r is not None and r.generation == event.generation:  # not an older copy
            r.loaded_at = None
            r.load_error = "the model was unloaded"
            self.refresh(event.model)

    def _on_finished(self, event: InferenceFinished) -> None:
        r = self._records.get(event.model)
        if r is None or event.cached or event.outcome != "success":
            return
        r.last_inference_s = event.engine_s
        r.failures, r.probe_error = 0, None
        self.refresh(event.model)

    def _on_failed(self, event: InferenceFailed) -> None:
        r = self._records.get(event.model)
        if r is None or event.error_type != "engine_error":  # a client's mistake is no fault
            return
        r.failures += 1
        r.last_error = event.message
        self.refresh(event.model)

    def _on_reload(self, event: ReloadStateChanged | ReloadProgressed) -> None:
        r = self._records.get(event.model)
        if r is not None:
            state = event.to_state if isinstance(event, ReloadStateChanged) else event.state
            r.reload = {"state": state, "progress_percent": event.progress_percent}

    def _on_probe(self, event: ProbeFinished) -> None:
        r = self._records.get(event.model)
        if r is None:
            return
        if event.ok:
            r.last_inference_s = event.latency_s
            r.failures, r.probe_error = 0, None
        else:
            r.probe_error = event.error or "failed"
        self.refresh(event.model)


class HealthChecker:
    """Answers health questions about a set of members (the ensemble's, or registered ones).

    ``tasks`` is the task group probes run in: a probe that outlives its caller's timeout
    finishes there and releases its lease, instead of being abandoned mid-inference.
    """

    def __init__(
        self,
        bus: EventBus,
        settings: HealthSettings,
        slots: dict[str, ModelSlot] | None = None,
        *,
        gpu: GpuMonitor | None = None,
        liveness: Callable[[], str | None] | None = None,
        loading: Callable[[], bool] | None = None,
    ) -> None:
        self.bus = bus
        self.settings = settings
        # The mapping itself, not a copy: members registered later are seen.
        self.slots: dict[str, ModelSlot] = slots if slots is not None else {}
        self.view = HealthView(bus, settings, list(self.slots))
        self.gpu = gpu if gpu is not None else GpuMonitor()
        self._liveness = liveness or (lambda: None)
        self._loading = loading or (lambda: False)
        self._probes: dict[str, Probe] = {}
        self._probing: dict[str, anyio.Event] = {}
        self.tasks: anyio.abc.TaskGroup | None = None
        self._process = psutil.Process()

    # -- registration (for users who embed models themselves) ----------------------------

    def register_model(self, name: str, instance: Engine | Any, *, queue_size: int = 16) -> None:
        """Track ``instance`` (an Engine, or a ``llama_cpp.Llama``) as member ``name``."""
        from .engine import LlamaEngine

        engine: Engine
        if hasattr(instance, "create_completion"):  # a llama_cpp.Llama
            engine = LlamaEngine.from_llama(name, instance)
        else:
            engine = instance
        path = Path(getattr(instance, "model_path", name))
        # model_construct: the model is already loaded, so there is no file to check.
        spec = ModelSpec.model_construct(name=name, path=path, queue_size=queue_size)
        slot = ModelSlot(spec)
        loaded = slot.install(engine)
        self.slots[name] = slot
        self.view.add(name)
        self.bus.publish(loaded_event(loaded, 0.0))

    # -- checks --------------------------------------------------------------------------------

    async def check_model_health(self, name: str, run_inference: bool = False) -> ModelHealth:
        """The health of member ``name`` (KeyError if there is none)."""
        slot = self.slots[name]
        probe = await self._probe(slot) if run_inference else None
        return self.snapshot(name, probe)

    async def check_all_models(self, run_inference: bool = False) -> dict[str, ModelHealth]:
        """Every member's health; probes of different members run side by side."""
        if not run_inference:  # no awaits: the answer costs microseconds under any load
            return {name: self.snapshot(name) for name in self.slots}
        probes: dict[str, Probe] = {}

        async def probe(name: str) -> None:
            probes[name] = await self._probe(self.slots[name])

        async with anyio.create_task_group() as tasks:
            for name in self.slots:
                tasks.start_soon(probe, name)
        return {name: self.snapshot(name, probes[name]) for name in self.slots}

    def snapshot(self, name: str, probe: Probe | None = None) -> ModelHealth:
        """Member ``name``'s health from what is known now (no inference)."""
        slot = self.slots[name]
        self.view.refresh(name)
        record = self.view.record(name)
        status = record.status
        loaded = slot.active is not None
        gpu_available = self.gpu.available
        return ModelHealth(
            model_name=name,
            status=status,
            loaded=loaded,
            inference_ready=loaded and status.serving,
            last_inference_ms=(
                round(record.last_inference_s * 1000, 3)
                if record.last_inference_s is not None
                else None
            ),
            memory_mb=round(record.memory_bytes / _MIB, 2) if loaded else None,
            gpu_memory_mb=(round(record.gpu_bytes / _MIB, 2) if gpu_available and loaded else None),
            error_message=None if status == HealthStatus.HEALTHY else record.reason,
            checked_at=utc_now(),
            uptime_seconds=(
                round(time.monotonic() - record.loaded_at, 3)
                if record.loaded_at is not None
                else None
            ),
            probe=probe,
            reload=record.reload,
        )

    def process_memory_mb(self) -> float:
        return round(self._process.memory_info().rss / _MIB, 2)

    def process_gpu_memory_mb(self) -> float | None:
        reading = self.gpu.process_memory()
        return round(reading.used_bytes / _MIB, 2) if reading is not None else None

    def check_readiness(self) -> tuple[bool, str | None]:
        """(ready, reason): ready when at least one member is loaded and not unhealthy."""
        if any(
            slot.active is not None and self.view.can_serve(name)
            for name, slot in self.slots.items()
        ):
            return True, None
        if self._loading():
            return False, "models are still loading"
        if not any(slot.active is not None for slot in self.slots.values()):
            return False, "no model is loaded"
        return False, "every loaded model is unhealthy"

    def check_liveness(self) -> tuple[bool, str | None]:
        """(alive, reason): dead when the watchdog finds the process stuck."""
        reason = self._liveness()
        return reason is None, reason

    # -- probes --------------------------------------------------------------------------------

    async def _probe(self, slot: ModelSlot) -> Probe:
        name, settings = slot.name, self.settings
        loaded = slot.active
        if loaded is None:
            return Probe("not_loaded", None, cached=False, error=slot.unavailable_reason())
        cached = self._probes.get(name)
        now = time.monotonic()
        if (
            cached is not None
            and cached.generation == loaded.generation
            and now - cached.at < settings.probe_cache_ttl_s
        ):
            return Probe(
                cached.outcome, cached.latency_ms, True, cached.error, cached.at, cached.generation
            )
        running = self._probing.get(name)
        if running is None:
            if loaded.in_flight > 0:
                # Busy with user traffic: never queue behind it; report the latest real one.
                last = self.view.record(name).last_inference_s
                return Probe(
                    "busy",
                    round(last * 1000, 3) if last is not None else None,
                    cached=False,
                    error="model busy with requests: showing the latest real inference",
                )
            running = self._probing[name] = anyio.Event()
            if self.tasks is not None:
                self.tasks.start_soon(self._run_probe, slot, loaded, running)
            else:  # embedded use without a running app: probe inline
                await self._run_probe(slot, loaded, running)
        with anyio.move_on_after(settings.probe_timeout_s):
            await running.wait()
        result = self._probes.get(name)
        if result is None or result.at < now:
            return Probe(
                "timeout",
                None,
                cached=False,
                error=f"no answer within {settings.probe_timeout_s:g} s",
            )
        return result

    async def _run_probe(self, slot: ModelSlot, loaded: Loaded, done: anyio.Event) -> None:
        name = slot.name
        started = time.monotonic()
        params = GenerationParams(max_tokens=1, temperature=0.0, top_p=1.0)
        prompt = self.settings.probe_prompt

        def one_token(engine: Engine) -> None:
            engine.complete(engine.tokenize(prompt), params)

        try:
            lease = slot.acquire()
            try:
                await lease.loaded.run(one_token, lease.loaded.engine)
            finally:
                lease.release()
        except Exception as err:
            elapsed = time.monotonic() - started
            self._probes[name] = Probe(
                "failed",
                round(elapsed * 1000, 3),
                False,
                str(err),
                time.monotonic(),
                loaded.generation,
            )
            self.bus.publish(ProbeFinished(name, False, elapsed, str(err)))
        else:
            elapsed = time.monotonic() - started
            self._probes[name] = Probe(
                "ok", round(elapsed * 1000, 3), False, None, time.monotonic(), loaded.generation
            )
            self.bus.publish(ProbeFinished(name, True, elapsed))
        finally:
            del self._probing[name]
            done.set()


_default: HealthChecker | None = None


def get_health_checker() -> HealthChecker:
    """The process-wide checker for models you load yourself (``register_model``).

    The server's own checker is ``app.state.health``; this one is for embedding.
    """
    global _default
    if _default is None:
        from .embedded import default_bus, default_slots

        _default = HealthChecker(default_bus(), HealthSettings(), default_slots())
    return _default


def check_readiness() -> tuple[bool, str | None]:
    """Readiness of the process-wide checker's models."""
    return get_health_checker().check_readiness()


def check_liveness() -> tuple[bool, str | None]:
    """Liveness of the process-wide checker."""
    return get_health_checker().check_liveness()
