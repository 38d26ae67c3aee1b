"""The log as a view: turns ensemble events into structured log lines."""

from __future__ import annotations

import structlog

from ensemble_ops.events import (
    CacheBackendChanged,
    DrainTimedOut,
    EventBus,
    GateJudged,
    HealthChanged,
    InferenceFailed,
    InferenceFinished,
    LimitsBackendChanged,
    ModelLoaded,
    ModelLoadFailed,
    ModelUnloaded,
    QualityJudged,
    QualitySkipped,
    RateLimited,
    ReloadStateChanged,
    RolloutFinished,
    RolloutStepped,
)

__all__ = ["subscribe_log"]

_log = structlog.get_logger("ensemble_ops.events")


def _loaded(event: ModelLoaded) -> None:
    _log.info(
        "model.loaded",
        model=event.model,
        generation=event.generation,
        weights_mb=round(event.weights_bytes / 2**20, 1),
        context_mb=round(event.context_bytes / 2**20, 1),
        load_s=round(event.load_s, 3),
    )


def _load_failed(event: ModelLoadFailed) -> None:
    _log.error("model.load_failed", model=event.model, error=event.error)


def _unloaded(event: ModelUnloaded) -> None:
    _log.info("model.unloaded", model=event.model, generation=event.generation)


def _finished(event: InferenceFinished) -> None:
    if event.outcome == "cancelled":
        _log.info(
            "inference.cancelled",
            model=event.model,
            mode=event.mode,
            completion_tokens=event.completion_tokens,
            latency_ms=round(event.latency_s * 1000, 2),
            copy=event.copy,
        )
        return
    _log.debug(
        "inference.finished",
        model=event.model,
        mode=event.mode,
        outcome=event.outcome,
        copy=event.copy,
        cached=event.cached,
        stream=event.stream,
        latency_ms=round(event.latency_s * 1000, 2),
        completion_tokens=event.completion_tokens,
        # The batch's side of it: how long it waited for a sequence slot, and its decode
        # speed while it shared the batch with the others.
        queue_wait_ms=_ms(event.queue_wait_s),
        time_per_token_ms=_ms(event.time_per_output_token_s),
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _failed(event: InferenceFailed) -> None:
    _log.warning(
        "inference.failed",
        model=event.model,
        mode=event.mode,
        error_type=event.error_type,
        error=event.message,
        copy=event.copy,
    )


def _health_changed(event: HealthChanged) -> None:
    log = _log.warning if event.new == "unhealthy" else _log.info
    log("health.changed", model=event.model, old=event.old, new=event.new, reason=event.reason)


def _reload_state(event: ReloadStateChanged) -> None:
    log = _log.warning if event.to_state in ("failed", "rolled_back") else _log.info
    log(
        "reload.state_changed",
        model=event.model,
        **{"from": event.from_state, "to": event.to_state},
        progress=event.progress_percent,
        message=event.message,
        elapsed=round(event.elapsed_s, 3),
    )


def _cache_backend(event: CacheBackendChanged) -> None:
    # Each failed operation is counted (llm_cache_errors_total), not logged: an outage
    # would otherwise log once per request.
    if event.up:
        _log.info("cache.backend_up", backend=event.backend)
    else:
        _log.warning(
            "cache.backend_down",
            backend=event.backend,
            reason=event.reason,
            consequence="requests are answered by the engine until it is back",
        )


def _drain_timeout(event: DrainTimedOut) -> None:
    _log.warning(
        "reload.drain_timeout",
        model=event.model,
        generation=event.generation,
        in_flight=event.in_flight,
    )


def _rollout_stepped(event: RolloutStepped) -> None:
    _log.info(
        "rollout.stepped",
        model=event.model,
        rollout=event.rollout,
        weight_percent=event.weight_percent,
        message=event.message,
    )


def _gate(event: GateJudged) -> None:
    # A gate judges every window of a rollout: only a failure is news at info level.
    log = _log.info if event.verdict == "fail" else _log.debug
    log(
        "rollout.gate",
        model=event.model,
        gate=event.gate,
        verdict=event.verdict,
        candidate=event.candidate,
        stable=event.stable,
        limit=event.limit,
        reason=event.reason,
    )


def _rollout_finished(event: RolloutFinished) -> None:
    log = _log.info if event.outcome == "promoted" else _log.warning
    log(
        "rollout.finished",
        model=event.model,
        rollout=event.rollout,
        outcome=event.outcome,
        reason=event.reason,
    )


def _rate_limited(event: RateLimited) -> None:
    _log.info("request.rate_limited", key=event.key, limit=event.limit)


def _limits_backend(event: LimitsBackendChanged) -> None:
    if event.up:
        _log.info("limits.backend_up", backend="redis")
    else:
        _log.warning(
            "limits.backend_down",
            backend="redis",
            reason=event.reason,
            consequence="each replica counts the keys' limits on its own until it is back",
        )


def _quality(event: QualityJudged) -> None:
    log = _log.warning if event.failures and event.copy == "candidate" else _log.info
    log(
        "quality.judged",
        model=event.model,
        copy=event.copy,
        golden_set=event.golden_set,
        passed=event.passed,
        cases=event.cases,
        pass_ratio=round(event.pass_ratio, 4),
        seconds=round(event.seconds, 3),
        failures=[
            {"case": case, "input": text, "expected": expected, "got": got}
            for case, text, expected, got in event.failures
        ],
    )


def _quality_skipped(event: QualitySkipped) -> None:
    _log.warning("quality.skipped", model=event.model, golden_set=event.golden_set)


def subscribe_log(bus: EventBus) -> None:
    bus.subscribe(QualityJudged, _quality)
    bus.subscribe(QualitySkipped, _quality_skipped)
    bus.subscribe(ReloadStateChanged, _reload_state)
    bus.subscribe(DrainTimedOut, _drain_timeout)
    bus.subscribe(RolloutStepped, _rollout_stepped)
    bus.subscribe(GateJudged, _gate)
    bus.subscribe(RolloutFinished, _rollout_finished)
    bus.subscribe(CacheBackendChanged, _cache_backend)
    bus.subscribe(RateLimited, _rate_limited)
    bus.subscribe(LimitsBackendChanged, _limits_backend)
    bus.subscribe(HealthChanged, _health_changed)
    bus.subscribe(ModelLoaded, _loaded)
    bus.subscribe(ModelLoadFailed, _load_failed)
    bus.subscribe(ModelUnloaded, _unloaded)
    bus.subscribe(InferenceFinished, _finished)
    bus.subscribe(InferenceFailed, _failed)
