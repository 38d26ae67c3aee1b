"""The metric families: every name, type, label set, help text and bucket bound.

Names, types and labels are a contract (the Grafana dashboard and the alert rules read
them), so they are declared here, in one place, apart from the event handlers that feed them
(``observability/metrics.py``). Each instance has its own ``Registry``: several apps in one
process never clash.
"""

from __future__ import annotations

from typing import get_args

import psutil
from aioprometheus.collectors import Counter, Gauge, Histogram, Registry

from ensemble_ops._version import __version__
from ensemble_ops.config import GATES, RolloutKind
from ensemble_ops.events import RELOAD_STATES, GateVerdict, ReloadOutcome, RolloutOutcome

__all__ = ["INFERENCE_BUCKETS", "MetricFamilies", "one_hot"]

INFERENCE_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # +Inf is added by aioprometheus
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Tokens per decode step: one per running sequence while decoding, more while prefilling."""
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
COMPUTE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RELOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Each value a series from the start, taken from the vocabularies the events declare.
RELOAD_OUTCOMES: tuple[str, ...] = get_args(ReloadOutcome)
HEALTH_STATES = ("healthy", "degraded", "unhealthy", "unknown")
GATE_VERDICTS: tuple[str, ...] = get_args(GateVerdict)
ROLLOUTS: tuple[str, ...] = get_args(RolloutKind)
ROLLOUT_OUTCOMES: tuple[str, ...] = get_args(RolloutOutcome)
VERDICT_GATES: tuple[str, ...] = (*GATES, "quality")
"""The gates with a verdict series: a rollout's live gates, and the quality gate of any reload."""
QUALITY_OUTCOMES = ("pass", "fail", "skipped")
RPS_WINDOW_S = 60.0
"""llm_requests_per_second is the count of finished requests in the last minute / 60."""


class MetricFamilies:
    """Every metric of the service, declared on a registry of its own."""

    def __init__(self) -> None:
        self.registry = Registry()
        self._process = psutil.Process()
        r = self.registry

        self.requests = Counter(
            "llm_requests_total",
            "Requests answered, by member, mode, outcome (success, error, cancelled) and copy "
            "(stable, or a rollout's candidate).",
            registry=r,
        )
        self.errors = Counter(
            "llm_errors_total",
            "Errors by member and type (each failed attempt, fallbacks included).",
            registry=r,
        )
        self.cache_hits = Counter("llm_cache_hits_total", "Response cache hits.", registry=r)
        self.cache_errors = Counter(
            "llm_cache_errors_total",
            "Failed or timed-out operations on the cache backend (the engine answered).",
            registry=r,
        )
        self.cache_backend_up = Gauge(
            "llm_cache_backend_up", "1 while the cache backend answers, else 0.", registry=r
        )
        self.cache_misses = Counter(
            "llm_cache_misses_total",
            "Response cache misses (deterministic requests only).",
            registry=r,
        )
        self.inference = Histogram(
            "llm_inference_duration_seconds",
            "Request latency through the engine (queue included, cache hits excluded), by "
            "member, mode and copy.",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.loaded = Gauge("llm_model_loaded", "1 while the member is loaded.", registry=r)
        self.memory = Gauge(
            "llm_model_memory_bytes",
            "Member memory by llama.cpp's sizes (weights + KV cache), split into ram and gpu.",
            registry=r,
        )
        self.active = Gauge(
            "llm_active_requests", "Requests holding the member (running + queued).", registry=r
        )
        self.rps = Gauge(
            "llm_requests_per_second",
            f"Finished requests per second over the last {RPS_WINDOW_S:g} s.",
            registry=r,
        )
        self.info = Gauge(
            "llm_ensemble_info", "Constant 1, labelled with the build and the members.", registry=r
        )
        self.reloads = Counter("llm_reload_total", "Reloads by outcome.", registry=r)
        self.reload_duration = Histogram(
            "llm_reload_duration_seconds",
            "Reload duration, start to completed or failed.",
            buckets=RELOAD_BUCKETS,
            registry=r,
        )
        self.reload_state = Gauge(
            "llm_reload_state", "1 on the member's current reload state.", registry=r
        )
        self.reload_progress = Gauge(
            "llm_reload_progress_percent", "Progress of the member's reload.", registry=r
        )
        self.drain_timeouts = Counter(
            "llm_reload_drain_timeouts_total",
            "Old copies still busy after reload.drain_timeout_s.",
            registry=r,
        )
        self.health = Gauge(
            "llm_health_status", "1 on the member's current health status.", registry=r
        )
        self.tokens = Counter(
            "llm_tokens_total", "Tokens processed, by kind (prompt, completion).", registry=r
        )
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds",
            "Time to the first streamed token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.rollout_weight = Gauge(
            "llm_rollout_weight_percent",
            "Share of the member's requests its rollout's new copy answers (0: no rollout).",
            registry=r,
        )
        self.gate_verdict = Gauge(
            "llm_rollout_gate_verdict",
            "1 on each rollout gate's latest verdict (pass, fail, hold); 0 on all: not judged.",
            registry=r,
        )
        self.rollouts = Counter(
            "llm_rollouts_total", "Rollouts ended, by kind and outcome.", registry=r
        )
        self.event_clients = Gauge(
            "llm_event_clients", "Clients following GET /events now.", registry=r
        )
        self.event_clients_dropped = Counter(
            "llm_event_clients_dropped_total",
            "Clients of GET /events dropped for falling 1,000 events behind.",
            registry=r,
        )
        self.quality_pass_ratio = Gauge(
            "llm_quality_pass_ratio",
            "Share of the golden set the copy passed at its last quality run (copy: stable "
            "is the serving copy, candidate a reload's new one).",
            registry=r,
        )
        self.quality_runs = Counter(
            "llm_quality_runs_total",
            "Quality gates of reloads, by outcome (pass, fail, skipped by the request).",
            registry=r,
        )
        self.queue_depth = Gauge("llm_queue_depth", "Requests waiting for the member.", registry=r)
        self.batch_size = Histogram(
            "llm_batch_size",
            "Tokens decoded per llama_decode step of the member's batching engine.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            "llm_kv_cache_usage_ratio",
            "Share of the member's KV cache held by running sequences (0 to 1).",
            registry=r,
        )
        self.tpot = Histogram(
            "llm_time_per_output_token_seconds",
            "Decode time per output token after the first.",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "llm_queue_wait_seconds",
            "Time a request waited for a free sequence slot of the batching engine.",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.kv_cache_retained = Gauge(
            "llm_kv_cache_retained_ratio",
            "Share of the member's KV cache idle slots keep for prompts to come (prefix "
            "reuse; freed least recently used when running sequences need it).",
            registry=r,
        )
        self.prefix_queries = Counter(
            "llm_prefix_cache_queries_tokens_total",
            "Prompt tokens of the member's engine answers (what prefix reuse could save).",
            registry=r,
        )
        self.prefix_hits = Counter(
            "llm_prefix_cache_hits_tokens_total",
            "Prompt tokens whose KV cells were reused from an earlier prompt (not prefilled).",
            registry=r,
        )
        self.compute_threads = Gauge(
            "llm_compute_threads",
            "The threads every member's decode steps share (the process's compute budget).",
            registry=r,
        )
        self.compute_wait = Histogram(
            "llm_compute_wait_seconds",
            "Time a decode step of the member waited for its threads (others held them).",
            buckets=COMPUTE_WAIT_BUCKETS,
            registry=r,
        )
        self.compute_busy = Gauge(
            "llm_compute_busy_ratio",
            "Share of the time since the last scrape the member's decode steps held threads.",
            registry=r,
        )
        self.rate_limited = Counter(
            "llm_rate_limited_total",
            "Requests a key's limit refused (429), by key name and limit (requests, tokens, "
            "parallel).",
            registry=r,
        )
        self.rate_limit_backend_up = Gauge(
            "llm_rate_limit_backend_up",
            "1 while the shared store of the keys' limits answers; 0: each replica counts "
            "on its own.",
            registry=r,
        )
        self.loop_lag = Gauge(
            "llm_event_loop_lag_seconds", "Latest event-loop lag seen by the watchdog.", registry=r
        )
        self.rss = Gauge(
            "process_resident_memory_bytes", "Resident memory size in bytes.", registry=r
        )
        self.vms = Gauge(
            "process_virtual_memory_bytes", "Virtual memory size in bytes.", registry=r
        )
        self.cpu = Counter(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            registry=r,
        )
        self.fds = Gauge("process_open_fds", "Number of open file descriptors.", registry=r)
        self.threads = Gauge("process_threads", "Number of OS threads.", registry=r)
        self.start_time = Gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            registry=r,
        )

    def seed(
        self,
        members: list[str],
        default_mode: str,
        cache_backend: str | None,
        keys: dict[str, tuple[str, ...]] | None = None,
        shared_limits: bool = False,
    ) -> None:
        """The series that exist before anything happened: each member's states at their
        start, counters at 0 (so ``increase()`` sees a member's first failed reload), the
        build's info and the process start time."""
        self.info.set(
            {
                "version": __version__,
                "models": ",".join(members),
                "default_mode": default_mode,
            },
            1,
        )
        for member in members:
            self.loaded.set({"model": member}, 0)
            one_hot(self.reload_state, member, "state", "idle", RELOAD_STATES)
            one_hot(self.health, member, "status", "unknown", HEALTH_STATES)
            self.reload_progress.set({"model": member}, 0)
            self.kv_cache_usage.set({"model": member}, 0)
            self.kv_cache_retained.set({"model": member}, 0)
            self.prefix_queries.set({"model": member}, 0)
            self.prefix_hits.set({"model": member}, 0)
            self.compute_busy.set({"model": member}, 0)
            self.rollout_weight.set({"model": member}, 0)
            for gate in VERDICT_GATES:
                one_hot(self.gate_verdict, member, "verdict", None, GATE_VERDICTS, gate=gate)
            for outcome in QUALITY_OUTCOMES:
                self.quality_runs.set({"model": member, "outcome": outcome}, 0)
            # Counters that exist at 0 from the start: increase() sees their first step,
            # so an alert on a member's first failed reload or rollback can fire.
            for outcome in RELOAD_OUTCOMES:
                self.reloads.set({"model": member, "outcome": outcome}, 0)
            for rollout in ROLLOUTS:
                for outcome in ROLLOUT_OUTCOMES:
                    labels = {"model": member, "rollout": rollout, "outcome": outcome}
                    self.rollouts.set(labels, 0)
        self.cache_hits.set({}, 0)
        self.cache_misses.set({}, 0)
        self.event_clients.set({}, 0)
        self.event_clients_dropped.set({}, 0)
        if cache_backend is not None:
            backend = {"backend": cache_backend}
            self.cache_errors.set(backend, 0)
            # Memory always answers; Redis is 0 until it has answered once.
            self.cache_backend_up.set(backend, 1 if cache_backend == "memory" else 0)
        self.start_time.set({}, self._process.create_time())
        for key, limits in (keys or {}).items():  # each configured limit's refusals, from 0
            for limit in limits:
                self.rate_limited.set({"key": key, "limit": limit}, 0)
        if shared_limits:
            self.rate_limit_backend_up.set({"backend": "redis"}, 0)


def one_hot(
    gauge: Gauge,
    model: str,
    label: str,
    current: str | None,
    values: tuple[str, ...],
    **fixed: str,
) -> None:
    """1 on ``current``, 0 on the other values: a state as PromQL can select it (None: 0 on
    all). ``fixed`` labels name one of several states a member has (a rollout gate)."""
    for value in values:
        gauge.set({"model": model, **fixed, label: value}, 1 if value == current else 0)
