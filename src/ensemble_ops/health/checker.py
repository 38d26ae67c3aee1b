"""Answers health questions: per member, for the ensemble, readiness and liveness.

It combines what the health view learnt from events with the members' own state, memory
readings and, on request, an inference probe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import anyio

from ensemble_ops.health.probe import Prober
from ensemble_ops.health.resources import ProcessResources
from ensemble_ops.health.status import HealthStatus, ModelHealth, ProbeResult, utc_now
from ensemble_ops.health.view import HealthView
from ensemble_ops.serving.gpu import GpuMonitor
from ensemble_ops.serving.slot import ModelSlot

__all__ = ["HealthChecker"]

_MIB = 2**20


class HealthChecker:
    """Health of a set of members (the app's ensemble, or the embedded API's members)."""

    def __init__(
        self,
        slots: Mapping[str, ModelSlot],
        view: HealthView,
        prober: Prober,
        resources: ProcessResources,
        *,
        liveness: Callable[[], str | None],
        loading: Callable[[], bool] = lambda: False,
    ) -> None:
        """``slots`` is read live (members registered later are seen); ``liveness`` says why
        the process is stuck, or None; ``loading`` whether members are still loading."""
        self.slots = slots
        self.view = view
        self.resources = resources
        self._prober = prober
        self._liveness = liveness
        self._loading = loading
        self._stopping = False

    def begin_shutdown(self) -> None:
        """The process is stopping: readiness fails from now on, so load balancers take this
        replica out while it still serves what they send meanwhile."""
        self._stopping = True

    async def check_model_health(self, name: str, run_inference: bool = False) -> ModelHealth:
        """The health of member ``name`` (KeyError if there is none)."""
        slot = self.slots[name]
        probe = await self._prober.probe(slot) if run_inference else None
        return self.snapshot(name, probe)

    async def check_all_models(self, run_inference: bool = False) -> dict[str, ModelHealth]:
        """Every member's health; probes of different members run side by side."""
        if not run_inference:  # no awaits: the answer costs microseconds under any load
            return {name: self.snapshot(name) for name in self.slots}
        probes: dict[str, ProbeResult] = {}

        async def probe(name: str) -> None:
            probes[name] = await self._prober.probe(self.slots[name])

        async with anyio.create_task_group() as tasks:
            for name in self.slots:
                tasks.start_soon(probe, name)
        return {name: self.snapshot(name, probes[name]) for name in self.slots}

    def snapshot(self, name: str, probe: ProbeResult | None = None) -> ModelHealth:
        """Member ``name``'s health from what is known now (no inference, no events)."""
        slot = self.slots[name]
        record = self.view.record(name)
        status = record.status
        loaded = slot.active is not None
        last = record.last_inference_s
        return ModelHealth(
            model_name=name,
            status=status,
            loaded=loaded,
            inference_ready=loaded and status.serving,
            last_inference_ms=round(last * 1000, 3) if last is not None else None,
            memory_mb=round(record.memory_bytes / _MIB, 2) if loaded else None,
            gpu_memory_mb=(
                round(record.gpu_bytes / _MIB, 2)
                if loaded and self.resources.gpu_available
                else None
            ),
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

    def check_readiness(self) -> tuple[bool, str | None]:
        """(ready, reason): ready when at least one member is loaded and not unhealthy, and
        the process is not shutting down."""
        if self._stopping:
            return False, "shutting down"
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

    # The process's own figures, for /health/llm/all.
    @property
    def gpu(self) -> GpuMonitor:
        return self.resources.gpu

    def process_memory_mb(self) -> float:
        return self.resources.memory_mb()

    def process_gpu_memory_mb(self) -> float | None:
        return self.resources.gpu_memory_mb()
