"""Prometheus metrics (aioprometheus) as a view of the event stream.

Names, types and labels are a contract: the Grafana dashboard and the alert rules read them.
Every update happens on the event loop (aioprometheus has no locks): events arrive there,
and the recording methods for users who call models themselves hop onto the loop when called
from a worker thread. Each ``Metrics`` has its own ``Registry`` and nothing here is
process-wide, so several apps in one process never clash (the embedded API's process-wide
instance lives in ``ensemble_ops.embedded``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar, cast

import psutil
from aioprometheus.collectors import Histogram
from aioprometheus.renderer import render

from ensemble_ops.events import (
    RELOAD_STATES,
    CacheBackendChanged,
    CacheBackendFailed,
    CacheLookedUp,
    Copy,
    DrainTimedOut,
    EventBus,
    GateJudged,
    HealthChanged,
    InferenceFailed,
    InferenceFinished,
    LimitsBackendChanged,
    LoopLagMeasured,
    ModelLoaded,
    ModelLoadFailed,
    ModelUnloaded,
    QualityJudged,
    QualitySkipped,
    RateLimited,
    ReloadFinished,
    ReloadProgressed,
    ReloadStateChanged,
    RolloutFinished,
    RolloutStepped,
)
from ensemble_ops.observability.families import (
    GATE_VERDICTS,
    HEALTH_STATES,
    INFERENCE_BUCKETS,
    RPS_WINDOW_S,
    VERDICT_GATES,
    MetricFamilies,
    one_hot,
)

__all__ = ["INFERENCE_BUCKETS", "Metrics"]

P = ParamSpec("P")
R = TypeVar("R")


class Metrics(MetricFamilies):
    """The service's metrics.

    ``enabled=False`` records nothing: ``subscribe`` subscribes to no event and every
    recording method (``record_*``, ``observe_inference``, ``observe_batch_sizes``,
    ``set_kv_cache_usage``, ``update_model_status``, the ``track_*`` helpers) returns without
    a change; the app then serves no metrics routes.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        members: list[str] | None = None,
        default_mode: str = "balanced",
        cache_backend: str | None = None,
        keys: dict[str, tuple[str, ...]] | None = None,
        shared_limits: bool = False,
    ) -> None:
        """``cache_backend`` names the response cache's backend (None: the cache is off);
        ``keys`` the API keys and the limits each has; ``shared_limits``: they live in
        Redis."""
        super().__init__()
        self.enabled = enabled
        self._collect_hooks: list[Callable[[Metrics], None]] = []
        self._rates: dict[tuple[str, str], deque[float]] = {}
        self._generations: dict[str, int] = {}
        self._finished_rollouts: set[str] = set()
        self._candidate_quality: dict[str, float] = {}  # a reload's new copy, until it ends
        self._reload_states: tuple[str, ...] = RELOAD_STATES
        self._loop: Any = None
        self._loop_thread: int | None = None
        if enabled:
            self.seed(members or [], default_mode, cache_backend, keys, shared_limits)

    # -- wiring --------------------------------------------------------------------------------

    def subscribe(self, bus: EventBus) -> None:
        if not self.enabled:
            return
        bus.subscribe(InferenceFinished, self._on_finished)
        bus.subscribe(InferenceFailed, self._on_failed)
        bus.subscribe(CacheLookedUp, self._on_cache)
        bus.subscribe(RateLimited, self._on_rate_limited)
        bus.subscribe(LimitsBackendChanged, self._on_limits_backend)
        bus.subscribe(CacheBackendFailed, self._on_cache_error)
        bus.subscribe(CacheBackendChanged, self._on_cache_backend)
        bus.subscribe(ModelLoaded, self._on_loaded)
        bus.subscribe(ModelUnloaded, self._on_unloaded)
        bus.subscribe(ModelLoadFailed, self._on_load_failed)
        bus.subscribe(ReloadStateChanged, self._on_reload_state)
        bus.subscribe(ReloadProgressed, self._on_reload_progress)
        bus.subscribe(ReloadFinished, self._on_reload_finished)
        bus.subscribe(DrainTimedOut, self._on_drain_timeout)
        bus.subscribe(HealthChanged, self._on_health)
        bus.subscribe(LoopLagMeasured, self._on_lag)
        bus.subscribe(RolloutStepped, self._on_rollout_stepped)
        bus.subscribe(GateJudged, self._on_gate)
        bus.subscribe(RolloutFinished, self._on_rollout_finished)
        bus.subscribe(QualityJudged, self._on_quality)
        bus.subscribe(QualitySkipped, self._on_quality_skipped)
        # ShadowFinished is deliberately not subscribed: a mirrored request's answer is
        # discarded, so it counts in no user-facing series (only the rollout's gates read it).

    def bind_loop(self, loop: Any) -> None:
        """Remember the event loop, so helpers called from other threads hop onto it."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def on_collect(self, hook: Callable[[Metrics], None]) -> None:
        """Run ``hook`` before each render (gauges read from live state: in-flight counts)."""
        self._collect_hooks.append(hook)

    def _call(self, func: Callable[..., None], *args: Any) -> None:
        if not self.enabled:
            return
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(func, *args)
        else:
            func(*args)

    # -- helpers (the public recording API) ----------------------------------------------

    def record_request(
        self,
        model: str,
        mode: str,
        status: str,
        copy: Copy = "stable",
        key: str = "anonymous",
    ) -> None:
        self._call(self._record_request, model, mode, status, copy, key)

    def record_error(self, model: str, error_type: str) -> None:
        self._call(self.errors.inc, {"model": model, "error_type": error_type})

    def record_cache_hit(self) -> None:
        self._call(self.cache_hits.inc, {})

    def record_cache_miss(self) -> None:
        self._call(self.cache_misses.inc, {})

    def observe_inference(
        self,
        model: str,
        mode: str,
        seconds: float,
        copy: Copy = "stable",
        key: str = "anonymous",
    ) -> None:
        labels = {"model": model, "mode": mode, "copy": copy, "key": key}
        self._call(self.inference.observe, labels, seconds)

    def observe_batch_sizes(self, model: str, sizes: Iterable[int]) -> None:
        """Observe each decode step's token count in llm_batch_size{model}.

        The collect hook passes the steps since the previous scrape, so each step counts once.
        """
        self._call(self._observe_batch_sizes, model, tuple(sizes))

    def set_kv_cache_usage(self, model: str, ratio: float, retained: float = 0.0) -> None:
        """Set llm_kv_cache_usage_ratio{model} (the share of the KV cache running sequences
        hold) and llm_kv_cache_retained_ratio{model} (kept by idle slots), each 0 to 1."""
        # Clamped: the contract promises 0..1, and the engine's count may round past it.
        self._call(self.kv_cache_usage.set, {"model": model}, min(max(ratio, 0.0), 1.0))
        self._call(self.kv_cache_retained.set, {"model": model}, min(max(retained, 0.0), 1.0))

    def update_model_status(
        self,
        model: str,
        loaded: bool,
        memory_bytes: int | None = None,
        gpu_memory_bytes: int | None = None,
    ) -> None:
        self._call(self._update_model_status, model, loaded, memory_bytes, gpu_memory_bytes)

    @contextlib.contextmanager
    def track_inference_time(self, model: str, mode: str) -> Iterator[None]:
        """Observe the block's duration in llm_inference_duration_seconds{model,mode,copy}
        (copy ``stable``)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe_inference(model, mode, time.perf_counter() - started)

    def track_llm_request(
        self, model: str, mode: str
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorator for sync or async functions: time it, count it as success or error."""

        def decorate(func: Callable[P, R]) -> Callable[P, R]:
            if inspect.iscoroutinefunction(func):

                @functools.wraps(func)
                async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                    with self._outcome(model, mode):
                        return await cast("Callable[P, Awaitable[Any]]", func)(*args, **kwargs)

                return cast("Callable[P, R]", run_async)

            @functools.wraps(func)
            def run(*args: P.args, **kwargs: P.kwargs) -> R:
                with self._outcome(model, mode):
                    return func(*args, **kwargs)

            return run

        return decorate

    @contextlib.contextmanager
    def _outcome(self, model: str, mode: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except Exception as err:
            self.record_error(model, type(err).__name__)
            self.record_request(model, mode, "error")
            raise
        else:
            self.record_request(model, mode, "success")
        finally:
            self.observe_inference(model, mode, time.perf_counter() - started)

    # -- rendering -------------------------------------------------------------------------------

    def collect(self) -> None:
        """Refresh the gauges that are read, not counted."""
        now = time.monotonic()
        for (model, mode), stamps in self._rates.items():
            while stamps and stamps[0] < now - RPS_WINDOW_S:
                stamps.popleft()
            self.rps.set({"model": model, "mode": mode}, len(stamps) / RPS_WINDOW_S)
        with self._process.oneshot():
            memory = self._process.memory_info()
            times = self._process.cpu_times()
            self.rss.set({}, memory.rss)
            self.vms.set({}, memory.vms)
            self.cpu.set({}, times.user + times.system)
            self.threads.set({}, self._process.num_threads())
            with contextlib.suppress(psutil.Error, AttributeError):  # no fds on Windows
                self.fds.set({}, self._process.num_fds())
        if self.enabled:  # a disabled registry records nothing, read or counted
            for hook in self._collect_hooks:
                hook(self)

    def render(self, accept: list[str]) -> tuple[bytes, dict[str, str]]:
        self.collect()
        content, headers = render(self.registry, accept)
        return content, dict(headers)

    def flat(self) -> dict[str, float | str]:
        """Every sample as ``name_label=value,...: value``; histograms as _bucket/_sum/_count.

        Non-finite values become strings ("+Inf", "NaN"): JSON has no such numbers.
        """
        self.collect()
        out: dict[str, float | str] = {}
        for collector in self.registry.get_all():
            samples: list[tuple[dict[str, str], Any]] = collector.get_all()
            for labels, value in samples:
                # model first, then the other labels by name: model=a,mode=fast,status=success
                ordered = sorted(labels.items(), key=lambda kv: (kv[0] != "model", kv[0]))
                key = ",".join(f"{k}={v}" for k, v in ordered)
                if isinstance(collector, Histogram):
                    for bound, count in value.items():
                        if bound == "sum":
                            out[_key(f"{collector.name}_sum", key)] = _number(count)
                        elif bound == "count":
                            out[_key(f"{collector.name}_count", key)] = _number(count)
                        else:
                            le = "+Inf" if bound == math.inf else f"{bound:g}"
                            bucket = f"{key},le={le}" if key else f"le={le}"
                            out[_key(f"{collector.name}_bucket", bucket)] = _number(count)
                else:
                    out[_key(collector.name, key)] = _number(value)
        return out

    # -- events ----------------------------------------------------------------------------------

    def _record_request(self, model: str, mode: str, status: str, copy: Copy, key: str) -> None:
        labels = {"model": model, "mode": mode, "status": status, "copy": copy, "key": key}
        self.requests.inc(labels)
        self._rates.setdefault((model, mode), deque()).append(time.monotonic())

    def _observe_batch_sizes(self, model: str, sizes: tuple[int, ...]) -> None:
        for size in sizes:
            self.batch_size.observe({"model": model}, size)

    def _on_finished(self, event: InferenceFinished) -> None:
        self._record_request(event.model, event.mode, event.outcome, event.copy, event.key)
        labels = {"model": event.model, "mode": event.mode}
        # Before the success check: a stream the client left still waited for its slot and
        # decoded its tokens, and a long wait may be why it left.
        if event.queue_wait_s is not None:
            self.queue_wait.observe(labels, event.queue_wait_s)
        if event.time_per_output_token_s is not None:
            self.tpot.observe(labels, event.time_per_output_token_s)
        if event.cached or event.outcome != "success":
            return
        self.inference.observe({**labels, "copy": event.copy, "key": event.key}, event.latency_s)
        self.prefix_queries.add({"model": event.model}, event.prompt_tokens)
        self.prefix_hits.add({"model": event.model}, event.cached_tokens)
        self.tokens.add({"model": event.model, "kind": "prompt"}, event.prompt_tokens)
        self.tokens.add({"model": event.model, "kind": "completion"}, event.completion_tokens)
        if event.time_to_first_token_s is not None:
            self.ttft.observe(labels, event.time_to_first_token_s)

    def _on_failed(self, event: InferenceFailed) -> None:
        self.errors.inc({"model": event.model, "error_type": event.error_type})
        if event.final:
            self._record_request(event.model, event.mode, "error", event.copy, event.key)

    def _on_rate_limited(self, event: RateLimited) -> None:
        self.rate_limited.inc({"key": event.key, "limit": event.limit})

    def _on_limits_backend(self, event: LimitsBackendChanged) -> None:
        self.rate_limit_backend_up.set({"backend": "redis"}, 1 if event.up else 0)

    def _on_cache(self, event: CacheLookedUp) -> None:
        (self.cache_hits if event.hit else self.cache_misses).inc({})

    def _on_cache_error(self, event: CacheBackendFailed) -> None:
        self.cache_errors.inc({"backend": event.backend})

    def _on_cache_backend(self, event: CacheBackendChanged) -> None:
        self.cache_backend_up.set({"backend": event.backend}, 1 if event.up else 0)

    def _update_model_status(
        self, model: str, loaded: bool, memory: int | None, gpu: int | None
    ) -> None:
        self.loaded.set({"model": model}, 1 if loaded else 0)
        if memory is not None:
            self.memory.set({"model": model, "memory_type": "ram"}, memory)
        if gpu is not None:
            self.memory.set({"model": model, "memory_type": "gpu"}, gpu)

    def _on_loaded(self, event: ModelLoaded) -> None:
        self._generations[event.model] = event.generation
        total = event.weights_bytes + event.context_bytes
        self._update_model_status(event.model, True, total - event.gpu_bytes, event.gpu_bytes)

    def _on_unloaded(self, event: ModelUnloaded) -> None:
        if self._generations.get(event.model) == event.generation:  # not a reload's old copy
            self._update_model_status(event.model, False, 0, 0)

    def _on_load_failed(self, event: ModelLoadFailed) -> None:
        self._update_model_status(event.model, False, 0, 0)

    def _on_reload_state(self, event: ReloadStateChanged) -> None:
        if event.to_state not in self._reload_states:  # a state added to the machine later
            self._reload_states = (*self._reload_states, event.to_state)
        one_hot(self.reload_state, event.model, "state", event.to_state, self._reload_states)
        self.reload_progress.set({"model": event.model}, event.progress_percent)

    def _on_reload_progress(self, event: ReloadProgressed) -> None:
        self.reload_progress.set({"model": event.model}, event.progress_percent)

    def _on_reload_finished(self, event: ReloadFinished) -> None:
        self.reloads.inc({"model": event.model, "outcome": event.outcome})
        self.reload_duration.observe({"model": event.model}, event.duration_s)
        candidate = self._candidate_quality.pop(event.model, None)
        if event.outcome == "completed" and candidate is not None:
            # The new copy serves now: its score is the stable copy's.
            self.quality_pass_ratio.set({"model": event.model, "copy": "stable"}, candidate)

    def _on_drain_timeout(self, event: DrainTimedOut) -> None:
        self.drain_timeouts.inc({"model": event.model})

    def _on_health(self, event: HealthChanged) -> None:
        one_hot(self.health, event.model, "status", event.new, HEALTH_STATES)

    def _on_lag(self, event: LoopLagMeasured) -> None:
        self.loop_lag.set({}, event.lag_s)

    def _on_rollout_stepped(self, event: RolloutStepped) -> None:
        self._start_rollout(event.model)
        self.rollout_weight.set({"model": event.model}, event.weight_percent)

    def _on_gate(self, event: GateJudged) -> None:
        self._start_rollout(event.model)
        one_hot(
            self.gate_verdict, event.model, "verdict", event.verdict, GATE_VERDICTS, gate=event.gate
        )
        if event.gate == "quality":
            self.quality_runs.inc({"model": event.model, "outcome": event.verdict})

    def _on_quality(self, event: QualityJudged) -> None:
        self.quality_pass_ratio.set({"model": event.model, "copy": event.copy}, event.pass_ratio)
        if event.copy == "candidate":
            self._candidate_quality[event.model] = event.pass_ratio

    def _on_quality_skipped(self, event: QualitySkipped) -> None:
        self.quality_runs.inc({"model": event.model, "outcome": "skipped"})

    def _on_rollout_finished(self, event: RolloutFinished) -> None:
        # After a promotion the new copy is simply the stable one: no candidate share remains.
        self.rollout_weight.set({"model": event.model}, 0)
        labels = {"model": event.model, "rollout": event.rollout, "outcome": event.outcome}
        self.rollouts.inc(labels)
        # The verdicts stay until the member's next rollout starts: the gate that failed a
        # rollback would otherwise vanish before Prometheus scraped it.
        self._finished_rollouts.add(event.model)

    def _start_rollout(self, model: str) -> None:
        """The first step or verdict of a member's next rollout clears the last one's verdicts."""
        if model in self._finished_rollouts:
            self._finished_rollouts.discard(model)
            for gate in VERDICT_GATES:
                one_hot(self.gate_verdict, model, "verdict", None, GATE_VERDICTS, gate=gate)


def _key(name: str, labels: str) -> str:
    return f"{name}_{labels}" if labels else name


def _number(value: Any) -> float | str:
    number = float(value)
    if math.isfinite(number):
        return number
    return "NaN" if math.isnan(number) else ("+Inf" if number > 0 else "-Inf")
