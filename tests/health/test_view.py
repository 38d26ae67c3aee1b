"""The health view: each member's status from events alone, and when it announces a change."""

from __future__ import annotations

import pytest

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
from ensemble_ops.health.view import HealthView

MIB = 2**20
LIMITS = HealthSettings(
    memory_limit_bytes=100 * MIB,
    latency_limit_s=2.0,
    time_per_token_limit_s=0.2,
    failure_threshold=3,
)


def _loaded(
    model: str = "m", generation: int = 1, weights: int = 10 * MIB, context: int = 0
) -> ModelLoaded:
    return ModelLoaded(model, generation, weights, context, load_s=0.1)


def _finished(
    model: str = "m",
    engine_s: float = 0.1,
    *,
    per_token_s: float | None = 0.01,
    cached: bool = False,
    outcome: str = "success",
) -> InferenceFinished:
    return InferenceFinished(
        model,
        "balanced",
        engine_s,
        3,
        4,
        cached=cached,
        stream=outcome == "cancelled",
        outcome="cancelled" if outcome == "cancelled" else "success",
        engine_s=engine_s,
        time_per_output_token_s=per_token_s,
    )


def _failed(model: str = "m", error_type: str = "engine_error") -> InferenceFailed:
    return InferenceFailed(model, "balanced", error_type, f"{error_type} happened", 0.1)


class _Changes:
    """Every HealthChanged the view publishes, as (model, old, new)."""

    def __init__(self, bus: EventBus) -> None:
        self.seen: list[HealthChanged] = []
        bus.subscribe(HealthChanged, self.seen.append)

    @property
    def moves(self) -> list[tuple[str, str, str]]:
        return [(c.model, c.old, c.new) for c in self.seen]


@pytest.fixture(name="bus")
def _bus() -> EventBus:
    return EventBus()


@pytest.fixture(name="view")
def _view(bus: EventBus) -> HealthView:
    return HealthView(bus, LIMITS, ["m", "other"])


@pytest.fixture(name="changes")
def _changes(bus: EventBus) -> _Changes:
    return _Changes(bus)


class TestStatus:
    def test_loading_is_unknown_then_loaded_is_healthy(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """A member is unknown while it loads (and may serve), healthy once loaded."""
        assert view.status("m") is HealthStatus.UNKNOWN
        assert view.can_serve("m")
        bus.publish(_loaded())
        assert view.status("m") is HealthStatus.HEALTHY
        assert view.record("m").reason == "ok"
        assert view.status("other") is HealthStatus.UNKNOWN

    def test_a_member_that_failed_to_load_is_unhealthy_with_the_error(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """A load failure makes the member unhealthy, its reason the load error."""
        bus.publish(ModelLoadFailed("m", "bad magic"))
        assert view.status("m") is HealthStatus.UNHEALTHY
        assert view.record("m").reason == "bad magic"
        assert not view.can_serve("m")

    def test_failures_up_to_the_threshold_then_one_success_heals(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """failure_threshold engine failures in a row make it unhealthy; one success heals."""
        bus.publish(_loaded())
        for _ in range(LIMITS.failure_threshold - 1):
            bus.publish(_failed())
        assert view.status("m") is HealthStatus.HEALTHY
        bus.publish(_failed())
        assert view.status("m") is HealthStatus.UNHEALTHY
        assert view.record("m").reason == "3 inferences failed in a row: engine_error happened"
        assert not view.can_serve("m")
        bus.publish(_finished())
        assert view.status("m") is HealthStatus.HEALTHY
        assert view.can_serve("m")

    def test_failures_count_in_a_row_only(self, bus: EventBus, view: HealthView) -> None:
        """A success between failures starts the count again."""
        bus.publish(_loaded())
        for _ in range(LIMITS.failure_threshold - 1):
            bus.publish(_failed())
        bus.publish(_finished())
        for _ in range(LIMITS.failure_threshold - 1):
            bus.publish(_failed())
        assert view.status("m") is HealthStatus.HEALTHY

    def test_client_errors_are_no_fault_of_the_member(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """Failures other than engine errors (a prompt too long, a full queue) do not count."""
        bus.publish(_loaded())
        for error_type in ("context_length_exceeded", "overloaded", "model_unavailable"):
            for _ in range(LIMITS.failure_threshold):
                bus.publish(_failed(error_type=error_type))
        assert view.status("m") is HealthStatus.HEALTHY

    def test_cache_hits_and_cancelled_streams_do_not_heal(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """Only an answer from the engine shows the member works again: a cache hit or a
        stream the client abandoned does not."""
        bus.publish(_loaded())
        for _ in range(LIMITS.failure_threshold):
            bus.publish(_failed())
        bus.publish(_finished(cached=True))
        bus.publish(_finished(outcome="cancelled"))
        assert view.status("m") is HealthStatus.UNHEALTHY

    def test_memory_over_the_limit_degrades(self, bus: EventBus, view: HealthView) -> None:
        """Weights plus context over memory_limit_bytes: degraded; exactly at it: healthy."""
        bus.publish(_loaded(weights=60 * MIB, context=40 * MIB))
        assert view.status("m") is HealthStatus.HEALTHY
        bus.publish(_loaded(generation=2, weights=60 * MIB, context=40 * MIB + 1))
        assert view.status("m") is HealthStatus.DEGRADED
        assert view.record("m").reason == "memory 100 MiB is over the limit of 100 MiB"
        assert view.can_serve("m")

    def test_slow_tokens_degrade_and_fast_ones_restore(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """Time per output token over time_per_token_limit_s degrades; at it, healthy."""
        bus.publish(_loaded())
        bus.publish(_finished(per_token_s=LIMITS.time_per_token_limit_s))
        assert view.status("m") is HealthStatus.HEALTHY
        bus.publish(_finished(per_token_s=0.25))
        assert view.status("m") is HealthStatus.DEGRADED
        assert view.record("m").reason == "the last answer took 250 ms per token (limit 200 ms)"
        bus.publish(_finished(per_token_s=0.05))
        assert view.status("m") is HealthStatus.HEALTHY

    def test_a_long_answer_is_not_slow_by_its_length(self, bus: EventBus, view: HealthView) -> None:
        """A 256-token answer taking far longer than latency_limit_s, at a normal speed per
        token, leaves the member healthy; its time is still shown."""
        bus.publish(_loaded())
        bus.publish(_finished(engine_s=30.0, per_token_s=0.1))
        assert view.status("m") is HealthStatus.HEALTHY
        assert view.record("m").last_inference_s == 30.0

    def test_a_slow_probe_degrades(self, bus: EventBus, view: HealthView) -> None:
        """A probe (one token) over latency_limit_s degrades; a fast probe restores."""
        bus.publish(_loaded())
        bus.publish(ProbeFinished("m", True, 2.5))
        assert view.status("m") is HealthStatus.DEGRADED
        assert view.record("m").reason == "the last inference probe took 2.50 s (limit 2 s)"
        bus.publish(ProbeFinished("m", True, 0.5))
        assert view.status("m") is HealthStatus.HEALTHY

    def test_failures_outrank_memory_and_latency(self, bus: EventBus, view: HealthView) -> None:
        """A member that is both failing and over its limits is unhealthy, not degraded."""
        bus.publish(_loaded(weights=200 * MIB))
        bus.publish(_finished(per_token_s=3.0))
        assert view.status("m") is HealthStatus.DEGRADED
        for _ in range(LIMITS.failure_threshold):
            bus.publish(_failed())
        assert view.status("m") is HealthStatus.UNHEALTHY

    def test_a_failed_probe_is_unhealthy_until_one_succeeds(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """A failed probe makes the member unhealthy at once; a probe that passes heals it and
        its latency counts as the last inference."""
        bus.publish(_loaded())
        bus.publish(ProbeFinished("m", ok=False, latency_s=0.2, error="decode -3"))
        assert view.status("m") is HealthStatus.UNHEALTHY
        assert view.record("m").reason == "inference probe failed: decode -3"
        bus.publish(ProbeFinished("m", ok=True, latency_s=2.5))
        assert view.status("m") is HealthStatus.DEGRADED
        assert view.record("m").last_inference_s == 2.5

    def test_a_successful_inference_clears_a_failed_probe(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """A real request that succeeds after a failed probe shows the member works."""
        bus.publish(_loaded())
        bus.publish(ProbeFinished("m", ok=False, latency_s=0.2))
        assert view.record("m").reason == "inference probe failed: failed"
        bus.publish(_finished())
        assert view.status("m") is HealthStatus.HEALTHY

    def test_a_probe_that_passes_resets_the_failure_count(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """After a passing probe it takes failure_threshold new failures to be unhealthy."""
        bus.publish(_loaded())
        for _ in range(LIMITS.failure_threshold):
            bus.publish(_failed())
        bus.publish(ProbeFinished("m", ok=True, latency_s=0.1))
        assert view.status("m") is HealthStatus.HEALTHY
        for _ in range(LIMITS.failure_threshold - 1):
            bus.publish(_failed())
        assert view.status("m") is HealthStatus.HEALTHY

    def test_a_new_copy_starts_with_a_clean_record(self, bus: EventBus, view: HealthView) -> None:
        """Loading a new copy (a reload) forgets the old copy's failures and probe error."""
        bus.publish(_loaded())
        for _ in range(LIMITS.failure_threshold - 1):
            bus.publish(_failed())
        bus.publish(ProbeFinished("m", ok=False, latency_s=0.1))
        bus.publish(_loaded(generation=2))
        assert view.status("m") is HealthStatus.HEALTHY
        bus.publish(_failed())
        assert view.status("m") is HealthStatus.HEALTHY
        assert view.record("m").generation == 2

    def test_unloading_the_serving_copy_makes_it_unhealthy(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """Unloading the current copy (shutdown, replace) makes the member unhealthy."""
        bus.publish(_loaded(generation=4))
        bus.publish(ModelUnloaded("m", 4))
        assert view.status("m") is HealthStatus.UNHEALTHY
        assert view.record("m").reason == "the model was unloaded"

    def test_closing_an_old_copy_leaves_the_new_one_healthy(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """After a reload the old copy's unload is not the member's: it stays healthy."""
        bus.publish(_loaded(generation=4))
        bus.publish(_loaded(generation=5))
        bus.publish(ModelUnloaded("m", 4))
        assert view.status("m") is HealthStatus.HEALTHY

    def test_events_of_one_member_leave_the_others_alone(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """Failures of one member never change another's status."""
        bus.publish(_loaded("m"))
        bus.publish(_loaded("other"))
        for _ in range(LIMITS.failure_threshold):
            bus.publish(_failed("m"))
        assert view.status("other") is HealthStatus.HEALTHY

    def test_members_the_view_was_not_told_about(self, bus: EventBus, view: HealthView) -> None:
        """A member registered later gets a record when it loads; unknown ones are unknown
        and may serve; events about members never loaded are ignored."""
        assert view.status("late") is HealthStatus.UNKNOWN
        assert view.can_serve("late")
        for event in (
            _failed("ghost"),
            _finished("ghost"),
            ProbeFinished("ghost", ok=False, latency_s=0.1),
            ModelUnloaded("ghost", 1),
            ReloadProgressed("ghost", "warming_up", 10.0, "Loading"),
        ):
            bus.publish(event)
        with pytest.raises(KeyError):
            view.record("ghost")
        bus.publish(_loaded("late"))
        assert view.status("late") is HealthStatus.HEALTHY
        bus.publish(ModelLoadFailed("later", "no file"))
        assert view.status("later") is HealthStatus.UNHEALTHY


class TestChanges:
    def test_a_change_is_announced_once_with_old_new_and_reason(
        self, bus: EventBus, view: HealthView, changes: _Changes
    ) -> None:
        """HealthChanged comes when the status moves, never when it stays."""
        bus.publish(_loaded())
        bus.publish(_finished())
        bus.publish(_finished())
        for _ in range(LIMITS.failure_threshold + 2):
            bus.publish(_failed())
        bus.publish(_finished())
        assert changes.moves == [
            ("m", "unknown", "healthy"),
            ("m", "healthy", "unhealthy"),
            ("m", "unhealthy", "healthy"),
        ]
        assert changes.seen[1].reason == "3 inferences failed in a row: engine_error happened"

    def test_reading_the_view_announces_nothing(
        self, bus: EventBus, view: HealthView, changes: _Changes
    ) -> None:
        """status, can_serve and record only read."""
        for _ in range(3):
            view.status("m")
            view.can_serve("m")
            view.record("m")
        assert changes.seen == []


class TestReloadProgress:
    def test_the_latest_reload_state_and_progress_are_kept(
        self, bus: EventBus, view: HealthView
    ) -> None:
        """State changes and progress within a state both update the member's reload brief."""
        assert view.record("m").reload is None
        bus.publish(ReloadStateChanged("m", "idle", "warming_up", 0.0, "Checking", 0.0))
        assert view.record("m").reload == ReloadProgress("warming_up", 0.0)
        bus.publish(ReloadProgressed("m", "warming_up", 30.0, "Warmup iteration 1/3"))
        assert view.record("m").reload == ReloadProgress("warming_up", 30.0)
        bus.publish(ReloadStateChanged("m", "switching", "completed", 100.0, "Done", 1.0))
        assert view.record("m").reload == ReloadProgress("completed", 100.0)
        assert view.record("other").reload is None
