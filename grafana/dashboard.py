"""The Grafana dashboard, as code (grafana-foundation-sdk): ``nox -s dashboard`` writes
``grafana/llm_dashboard.json`` from it, and a test fails when the committed JSON differs.

Every PromQL expression here reads only the metric names of docs/metrics.md; a test runs
each one against a real Prometheus that scraped a real server, so no panel shows "No data".
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import (
    bargauge,
    common,
    dashboard,
    gauge,
    piechart,
    prometheus,
    stat,
    statetimeline,
    timeseries,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    GridPos,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
)

OUTPUT = Path(__file__).parent / "llm_dashboard.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="ensemble-ops-prometheus")
"""The uid provisioning/datasources/prometheus.yml gives the Prometheus datasource."""
M = 'model=~"$model"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class PanelSpec:
    """One panel: its kind, title, what it shows, and its queries (expr, legend)."""

    kind: str
    title: str
    description: str
    queries: list[tuple[str, str]]
    unit: str = "short"
    width: int = 8
    options: dict[str, Any] = field(default_factory=dict)


PANELS: list[PanelSpec] = [
    PanelSpec(
        "timeseries",
        "Request rate (RPS)",
        "Requests per second by member, mode and outcome.",
        [
            (
                f"sum by (model, mode, status) (rate(llm_requests_total{{{M}}}[{RATE}]))",
                "{{model}} {{mode}} {{status}}",
            )
        ],
        "reqps",
    ),
    PanelSpec(
        "timeseries",
        "Active requests",
        "Requests holding each member: running plus queued.",
        [(f"sum by (model) (llm_active_requests{{{M}}})", "{{model}}")],
    ),
    PanelSpec(
        "timeseries",
        "Inference latency p50 / p95 / p99",
        "Request latency through the engine, queue included.",
        [
            (
                f"histogram_quantile({q}, sum by (le) (rate("
                f"llm_inference_duration_seconds_bucket{{{M}}}[{RATE}])))",
                f"p{p}",
            )
            for q, p in (("0.5", "50"), ("0.95", "95"), ("0.99", "99"))
        ],
        "s",
    ),
    PanelSpec(
        "timeseries",
        "Error rate",
        "Share of requests that ended in an error.",
        [
            (
                f'sum(rate(llm_requests_total{{status="error",{M}}}[{RATE}])) / '
                f"clamp_min(sum(rate(llm_requests_total{{{M}}}[{RATE}])), 1e-9)",
                "error rate",
            )
        ],
        "percentunit",
    ),
    PanelSpec(
        "stat",
        "Cache hit rate",
        "Hits among deterministic requests (temperature 0 or a seed).",
        [
            (
                f"100 * sum(rate(llm_cache_hits_total[{RATE}])) / clamp_min("
                f"sum(rate(llm_cache_hits_total[{RATE}])) + "
                f"sum(rate(llm_cache_misses_total[{RATE}])), 1e-9)",
                "hit rate",
            )
        ],
        "percent",
        4,
    ),
    PanelSpec(
        "stat",
        "Total requests: success vs failure",
        "Requests in the dashboard's time range by outcome.",
        [(f"sum by (status) (increase(llm_requests_total{{{M}}}[$__range]))", "{{status}}")],
        "short",
        4,
    ),
    PanelSpec(
        "stat",
        "Model status (loaded)",
        "1 while the member is loaded.",
        [(f"llm_model_loaded{{{M}}}", "{{model}}")],
        "short",
        8,
        {"loaded_mapping": True},
    ),
    PanelSpec(
        "timeseries",
        "RAM usage",
        "Members by llama.cpp's sizes (weights + KV cache) and the whole process (RSS).",
        [
            (f'llm_model_memory_bytes{{memory_type="ram",{M}}}', "{{model}}"),
            ("process_resident_memory_bytes", "process RSS"),
        ],
        "bytes",
    ),
    PanelSpec(
        "piechart",
        "Request distribution by model",
        "Requests in the time range per answering member.",
        [(f"sum by (model) (increase(llm_requests_total{{{M}}}[$__range]))", "{{model}}")],
    ),
    PanelSpec(
        "timeseries",
        "Cache hits / misses",
        "Response cache lookups per second.",
        [
            (f"sum(rate(llm_cache_hits_total[{RATE}]))", "hits"),
            (f"sum(rate(llm_cache_misses_total[{RATE}]))", "misses"),
        ],
        "ops",
    ),
    PanelSpec(
        "bargauge",
        "Average latency by mode",
        "Mean request latency per mode.",
        [
            (
                f"sum by (mode) (rate(llm_inference_duration_seconds_sum{{{M}}}[{RATE}])) / "
                f"sum by (mode) (rate(llm_inference_duration_seconds_count{{{M}}}[{RATE}]))",
                "{{mode}}",
            )
        ],
        "s",
    ),
    PanelSpec(
        "timeseries",
        "Error types",
        "Failed attempts per second by type (fallbacks included), stacked.",
        [(f"sum by (error_type) (rate(llm_errors_total{{{M}}}[{RATE}]))", "{{error_type}}")],
        "ops",
        8,
        {"stacked": True},
    ),
]
"""The twelve panels operators asked for, in order."""

BEYOND: list[PanelSpec] = [
    PanelSpec(
        "statetimeline",
        "Health status",
        "Each member's tri-state health over time.",
        [(f"max by (model, status) (llm_health_status{{{M}}}) == 1", "{{model}} {{status}}")],
        "short",
        12,
    ),
    PanelSpec(
        "statetimeline",
        "Reload state",
        "Each member's reload machine state.",
        [(f"max by (model, state) (llm_reload_state{{{M}}}) == 1", "{{model}} {{state}}")],
        "short",
        12,
    ),
    PanelSpec(
        "gauge",
        "Reload progress",
        "Progress of the latest reload per member.",
        [(f"llm_reload_progress_percent{{{M}}}", "{{model}}")],
        "percent",
        6,
    ),
    PanelSpec(
        "stat",
        "Reload outcomes",
        "Reloads in the time range by outcome.",
        [(f"sum by (outcome) (increase(llm_reload_total{{{M}}}[$__range]))", "{{outcome}}")],
        "short",
        6,
    ),
    PanelSpec(
        "timeseries",
        "Time to first token p95",
        "Streams: request start to first token.",
        [
            (
                f"histogram_quantile(0.95, sum by (le, model) (rate("
                f"llm_time_to_first_token_seconds_bucket{{{M}}}[{RATE}])))",
                "{{model}}",
            )
        ],
        "s",
        6,
    ),
    PanelSpec(
        "timeseries",
        "Queue depth",
        "Requests waiting per member (503 past queue_size).",
        [(f"llm_queue_depth{{{M}}}", "{{model}}")],
        "short",
        6,
    ),
]
"""The row beyond them: health, reloads, time to first token, queue depth."""

BATCHING: list[PanelSpec] = [
    PanelSpec(
        "timeseries",
        "Batch size p50 / p95",
        "Tokens per llama_decode step of each member. Near the member's `parallel` the batch "
        "is full: every sequence slot decodes together.",
        [
            (
                f"histogram_quantile({q}, sum by (le, model) (rate("
                f"llm_batch_size_bucket{{{M}}}[{RATE}])))",
                f"{{{{model}}}} p{p}",
            )
            for q, p in (("0.5", "50"), ("0.95", "95"))
        ],
        "short",
        6,
    ),
    PanelSpec(
        "timeseries",
        "KV cache usage",
        "Share of each member's KV cache (n_ctx per sequence slot) held by running "
        "sequences. Near 100% long contexts crowd the cache; low with a large n_ctx, memory "
        "could serve more slots.",
        [(f"llm_kv_cache_usage_ratio{{{M}}}", "{{model}}")],
        "percentunit",
        6,
        {"ratio": True},
    ),
    PanelSpec(
        "timeseries",
        "Time per output token p95",
        "Decode time per token after the first, by member and mode: the pace a stream "
        "reads at; it grows as the batch fills.",
        [
            (
                f"histogram_quantile(0.95, sum by (le, model, mode) (rate("
                f"llm_time_per_output_token_seconds_bucket{{{M}}}[{RATE}])))",
                "{{model}} {{mode}}",
            )
        ],
        "s",
        6,
    ),
    PanelSpec(
        "timeseries",
        "Queue wait p95",
        "Time a request waited for a free sequence slot, by member and mode. Rising: add "
        "replicas or raise `parallel`.",
        [
            (
                f"histogram_quantile(0.95, sum by (le, model, mode) (rate("
                f"llm_queue_wait_seconds_bucket{{{M}}}[{RATE}])))",
                "{{model}} {{mode}}",
            )
        ],
        "s",
        6,
    ),
]
"""The continuous-batching engine: how full its batches and KV cache are, and what it costs."""


def _verdict(verdict: str) -> str:
    return f'max by (model, gate) (llm_rollout_gate_verdict{{verdict="{verdict}",{M}}})'


ROLLOUTS: list[PanelSpec] = [
    PanelSpec(
        "timeseries",
        "Candidate weight",
        "Share of each member's requests its rollout's new copy answers; 0 when no rollout "
        "runs (and again once the new copy is promoted or rolled back).",
        [(f"llm_rollout_weight_percent{{{M}}}", "{{model}}")],
        "percent",
        6,
        {"percent": True},
    ),
    PanelSpec(
        "statetimeline",
        "Gate verdicts",
        "Each gate's latest verdict per member, new copy against the old over the same "
        "window: fail, hold (too little data) or pass. A failed gate rolls the rollout back; "
        "the verdicts stay until the member's next rollout.",
        [
            (
                f"{_verdict('pass')} + 2 * {_verdict('hold')} + 3 * {_verdict('fail')}",
                "{{model}} {{gate}}",
            )
        ],
        "short",
        12,
        {"verdict_mapping": True},
    ),
    PanelSpec(
        "stat",
        "Rollout outcomes",
        "Rollouts in the time range by outcome: promoted, rolled back or failed.",
        [(f"sum by (outcome) (increase(llm_rollouts_total{{{M}}}[$__range]))", "{{outcome}}")],
        "short",
        6,
    ),
    PanelSpec(
        "timeseries",
        "Request rate by copy",
        "Requests per second each member's stable and candidate copies answer.",
        [
            (
                f"sum by (model, copy) (rate(llm_requests_total{{{M}}}[{RATE}]))",
                "{{model}} {{copy}}",
            )
        ],
        "reqps",
        12,
    ),
    PanelSpec(
        "timeseries",
        "Latency p95 by copy",
        "Request latency through the engine per member and copy: is the new copy slower?",
        [
            (
                f"histogram_quantile(0.95, sum by (le, model, copy) (rate("
                f"llm_inference_duration_seconds_bucket{{{M}}}[{RATE}])))",
                "{{model}} {{copy}}",
            )
        ],
        "s",
        12,
    ),
    PanelSpec(
        "timeseries",
        "Golden-set pass rate",
        "Share of its golden set each copy passed at its last quality run: candidate is a "
        "reload's new copy (judged before it takes traffic), stable the serving copy it was "
        "compared with. A candidate below its member's floor is rolled back.",
        [(f"llm_quality_pass_ratio{{{M}}}", "{{model}} {{copy}}")],
        "percentunit",
        12,
        {"ratio": True},
    ),
    PanelSpec(
        "stat",
        "Quality gates",
        "Reloads' quality gates in the time range by outcome: pass, fail (rolled back before "
        "any traffic) or skipped by the reload request.",
        [
            (
                f"sum by (outcome) (increase(llm_quality_runs_total{{{M}}}[$__range]))",
                "{{outcome}}",
            )
        ],
        "short",
        12,
    ),
]
"""Canary, shadow and blue-green reloads: the new copy's share, its gates, and both copies;
the quality gate of every reload."""

COMPUTE: list[PanelSpec] = [
    PanelSpec(
        "timeseries",
        "Compute share by member",
        "Share of the time each member's decode steps held threads of the machine's "
        "budget (llm_compute_threads). Members active together share the budget; one alone "
        "takes it all.",
        [(f"llm_compute_busy_ratio{{{M}}}", "{{model}}")],
        "percentunit",
        6,
        {"ratio": True},
    ),
    PanelSpec(
        "timeseries",
        "Compute wait p95",
        "Time a decode step waited for threads another member's steps held. Rising: the "
        "members want more cores than the machine has (a replica, or fewer members per node).",
        [
            (
                f"histogram_quantile(0.95, sum by (le, model) (rate("
                f"llm_compute_wait_seconds_bucket{{{M}}}[{RATE}])))",
                "{{model}}",
            )
        ],
        "s",
        6,
    ),
    PanelSpec(
        "timeseries",
        "Prefix cache hit rate",
        "Share of prompt tokens whose KV cells were reused from an earlier prompt (not "
        "prefilled again): chats that resend their history and shared preambles.",
        [
            (
                f"sum by (model) (rate(llm_prefix_cache_hits_tokens_total{{{M}}}[{RATE}])) / "
                f"clamp_min(sum by (model) (rate("
                f"llm_prefix_cache_queries_tokens_total{{{M}}}[{RATE}])), 1e-9)",
                "{{model}}",
            )
        ],
        "percentunit",
        6,
    ),
    PanelSpec(
        "timeseries",
        "KV cache kept for prompts to come",
        "Share of each member's KV cache idle slots keep (retained prefixes), beside the "
        "share running sequences hold (the Batching row); retained cells give way to "
        "running ones, least recently used first.",
        [(f"llm_kv_cache_retained_ratio{{{M}}}", "{{model}}")],
        "percentunit",
        6,
        {"ratio": True},
    ),
]
"""One machine, many models: the compute budget's shares and waits, and prompt prefix reuse."""

ROWS: list[tuple[str, int, list[PanelSpec]]] = [
    ("Health, reloads, streaming and queues", 100, BEYOND),
    ("Batching", 200, BATCHING),
    ("Rollouts", 300, ROLLOUTS),
    ("Compute and prefix reuse", 400, COMPUTE),
]
"""The rows below the twelve panels: title, the row's id (its panels count on from it), panels."""


def _panel(spec: PanelSpec, grid: GridPos, panel_id: int) -> Any:
    builders: dict[str, Any] = {
        "timeseries": timeseries.Panel,
        "stat": stat.Panel,
        "piechart": piechart.Panel,
        "bargauge": bargauge.Panel,
        "gauge": gauge.Panel,
        "statetimeline": statetimeline.Panel,
    }
    panel = (
        builders[spec.kind]()
        .id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(DATASOURCE)
        .unit(spec.unit)
        .grid_pos(grid)
    )
    for ref, (expr, legend) in zip("ABCDEFGH", spec.queries, strict=False):
        panel = panel.with_target(
            prometheus.Dataquery()
            .ref_id(ref)
            .expr(expr)
            .legend_format(legend)
            .datasource(DATASOURCE)
        )
    if spec.options.get("ratio"):
        panel = panel.min(0).max(1)
    if spec.options.get("percent"):
        panel = panel.min(0).max(100)
    if spec.options.get("stacked"):
        panel = panel.stacking(common.StackingConfig().mode(StackingMode.NORMAL))
    if spec.options.get("loaded_mapping"):
        panel = panel.mappings(
            [
                ValueMap(
                    options={
                        "0": ValueMappingResult(text="not loaded", color="red", index=0),
                        "1": ValueMappingResult(text="loaded", color="green", index=1),
                    }
                )
            ]
        )
    if spec.options.get("verdict_mapping"):
        # The query's code: 1 pass, 2 hold, 3 fail; 0 before the gate's first verdict.
        panel = panel.mappings(
            [
                ValueMap(
                    options={
                        "0": ValueMappingResult(text="not judged", color="transparent", index=0),
                        "1": ValueMappingResult(text="pass", color="green", index=1),
                        "2": ValueMappingResult(text="hold", color="yellow", index=2),
                        "3": ValueMappingResult(text="fail", color="red", index=3),
                    }
                )
            ]
        )
    return panel


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    board = (
        dashboard.Dashboard("ensemble-ops: LLM ensemble")
        .uid("ensemble-ops-llm")
        .tags(["ensemble-ops", "llm", "generated"])
        .description(
            "Requests, latency, errors, cache, memory, health, reloads, batching and rollouts "
            "of an ensemble-ops service. Generated by grafana/dashboard.py."
        )
        .refresh("10s")
        .time("now-1h", "now")
        .with_variable(
            dashboard.QueryVariable("model")
            .label("Model")
            .datasource(DATASOURCE)
            .query("label_values(llm_model_loaded, model)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    x = y = 0
    for panel_id, spec in enumerate(PANELS, start=1):
        if x + spec.width > 24:
            x, y = 0, y + 8
        board = board.with_panel(_panel(spec, GridPos(h=8, w=spec.width, x=x, y=y), panel_id))
        x += spec.width
    for title, row_id, specs in ROWS:
        y += 8
        board = board.with_row(
            dashboard.Row(title).id(row_id).grid_pos(GridPos(h=1, w=24, x=0, y=y))
        )
        x, y = 0, y + 1
        for panel_id, spec in enumerate(specs, start=row_id + 1):
            if x + spec.width > 24:
                x, y = 0, y + 8
            board = board.with_panel(_panel(spec, GridPos(h=8, w=spec.width, x=x, y=y), panel_id))
            x += spec.width
    model: dict[str, Any] = json.loads(JSONEncoder(sort_keys=True, indent=2).encode(board.build()))
    return model


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    if "--check" in sys.argv:
        sys.exit(0 if OUTPUT.read_text() == render() else 1)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
