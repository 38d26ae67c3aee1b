"""The health view: each member's health, kept from events alone.

Status rules (thresholds in ``[health]``):

- unknown: still loading;
- unhealthy: not loaded, the inference probe failed, or the last ``failure_threshold``
  inferences failed;
- degraded: llama.cpp memory over ``memory_limit_bytes``, the last probe slower than
  ``latency_limit_s``, or the last answer slower per output token than
  ``time_per_token_limit_s`` (never the length of a long generation);
- healthy otherwise. One successful inference (or probe) makes an unhealthy member recover.

A status is re-evaluated when an event changes what it depends on, and ``HealthChanged`` is
published then; reading the view never publishes anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ensemble_ops.config import HealthSettings
from ensemble_ops.events import (
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
from ensemble_ops.health.status import HealthStatus, ReloadProgress

__all__ = ["HealthView", "MemberRecord"]

_MIB = 2**20


@dataclass
class MemberRecord:
    """What the view knows of one member, from events only."""

    loading: bool = True
    generation: int = 0
    loaded_at: float | None = None  # monotonic
    memory_bytes: int = 0
    gpu_bytes: int = 0
    load_error: str | None = None
    last_inference_s: float | None = None
    """The latest real inference (answer or probe), shown in health; not a verdict."""
    last_probe_s: float | None = None
    last_time_per_token_s: float | None = None
    failures: int = 0
    last_error: str | None = None
    probe_error: str | None = None
    status: HealthStatus = HealthStatus.UNKNOWN
    reason: str = "the model is still loading"
    reload: ReloadProgress | None = None


class HealthView:
    """Per-member health records kept from events; publishes ``HealthChanged``."""

    def __init__(self, bus: EventBus, settings: HealthSettings, members: list[str]) -> None:
        self._bus = bus
        self._settings = settings
        self._records = {name: MemberRecord() for name in members}
        bus.subscribe(ModelLoaded, self._on_loaded)
        bus.subscribe(ModelLoadFailed, self._on_load_failed)
        bus.subscribe(ModelUnloaded, self._on_unloaded)
        bus.subscribe(InferenceFinished, self._on_finished)
        bus.subscribe(InferenceFailed, self._on_failed)
        bus.subscribe(ProbeFinished, self._on_probe)
        bus.subscribe(ReloadStateChanged, self._on_reload)
        bus.subscribe(ReloadProgressed, self._on_reload)

    def record(self, name: str) -> MemberRecord:
        """The member's record (KeyError for a member the view was not told about)."""
        return self._records[name]

    def status(self, name: str) -> HealthStatus:
        record = self._records.get(name)
        return record.status if record is not None else HealthStatus.UNKNOWN

    def can_serve(self, name: str) -> bool:
        """For routing: False only for members known to be unhealthy."""
        return self.status(name) != HealthStatus.UNHEALTHY

    def _evaluate(self, r: MemberRecord) -> tuple[HealthStatus, str]:
        limits = self._settings
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
        if r.last_probe_s is not None and r.last_probe_s > limits.latency_limit_s:
            return HealthStatus.DEGRADED, (
                f"the last inference probe took {r.last_probe_s:.2f} s "
                f"(limit {limits.latency_limit_s:g} s)"
            )
        per_token = r.last_time_per_token_s
        if per_token is not None and per_token > limits.time_per_token_limit_s:
            return HealthStatus.DEGRADED, (
                f"the last answer took {per_token * 1000:.0f} ms per token "
                f"(limit {limits.time_per_token_limit_s * 1000:.0f} ms)"
            )
        return HealthStatus.HEALTHY, "ok"

    def _refresh(self, name: str) -> None:
        """Re-evaluate ``name`` after an event and publish ``HealthChanged`` if it moved."""
        record = self._records[name]
        status, reason = self._evaluate(record)
        old, record.reason = record.status, reason
        if status != old:
            record.status = status
            self._bus.publish(HealthChanged(name, old.value, status.value, reason))

    def _get(self, name: str) -> MemberRecord:
        """The record of ``name``, created for a member registered after the view was built."""
        return self._records.setdefault(name, MemberRecord())

    # -- events --------------------------------------------------------------------------------

    def _on_loaded(self, event: ModelLoaded) -> None:
        r = self._get(event.model)
        r.loading, r.generation, r.loaded_at = False, event.generation, time.monotonic()
        r.memory_bytes = event.weights_bytes + event.context_bytes
        r.gpu_bytes = event.gpu_bytes
        r.load_error = r.probe_error = r.last_error = None
        r.failures = 0
        self._refresh(event.model)

    def _on_load_failed(self, event: ModelLoadFailed) -> None:
        r = self._get(event.model)
        r.loading, r.load_error = False, event.error
        self._refresh(event.model)

    def _on_unloaded(self, event: ModelUnloaded) -> None:
        r = self._records.get(event.model)
        if r is not None and r.generation == event.generation:  # not an older copy
            r.loaded_at = None
            r.load_error = "the model was unloaded"
            self._refresh(event.model)

    def _on_finished(self, event: InferenceFinished) -> None:
        r = self._records.get(event.model)
        # A rollout's new copy says nothing of the member's health: its gates judge it.
        if r is None or event.cached or event.outcome != "success" or event.copy != "stable":
            return
        r.last_inference_s = event.engine_s
        if event.time_per_output_token_s is not None:
            r.last_time_per_token_s = event.time_per_output_token_s
        r.failures, r.probe_error = 0, None
        self._refresh(event.model)

    def _on_failed(self, event: InferenceFailed) -> None:
        r = self._records.get(event.model)
        if r is None or event.error_type != "engine_error":  # a client's mistake is no fault
            return
        if event.copy != "stable":  # a rollout's new copy: its gates judge it, and roll back
            return
        r.failures += 1
        r.last_error = event.message
        self._refresh(event.model)

    def _on_reload(self, event: ReloadStateChanged | ReloadProgressed) -> None:
        r = self._records.get(event.model)
        if r is not None:
            state = event.to_state if isinstance(event, ReloadStateChanged) else event.state
            r.reload = ReloadProgress(state, event.progress_percent)

    def _on_probe(self, event: ProbeFinished) -> None:
        r = self._records.get(event.model)
        if r is None:
            return
        if event.ok:
            r.last_inference_s = r.last_probe_s = event.latency_s
            r.failures, r.probe_error = 0, None
        else:
            r.probe_error = event.error or "failed"
        self._refresh(event.model)
