"""One summary of the benchmark results, each key figure next to its goal.

Reads ``serving.json``, ``reload.json`` and ``metrics.json`` from ``benchmarks/results/``
(whichever exist), prints one table (``--markdown`` also prints it as Markdown, for
``docs/performance.md``) and writes the merged ``latest.json``: one object with ``serving``,
``reload``, ``metrics``, ``machine``, ``generated_at``, and ``summary`` (the table's rows).
A figure whose file is missing shows as ``-``; ``--check`` exits 1 when a present figure
misses its goal. Run after ``nox -s bench``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"
SOURCES = ("serving", "reload", "metrics")

# Goals, as the project's issues state them; None: a figure reported without a goal.
VS_DIRECT_GOAL: dict[str, float | None] = {"demo-tiny": None, "demo-base": 0.90}
VS_PEER_GOAL: dict[str, float | None] = {"demo-tiny": 3.0, "demo-base": None}
PROBE_CLIENT_P99_MS = {
    "/v1/models": 20.0,
    "/health/live": 10.0,
    "/health/ready": 10.0,
    "/health/llm/all": 10.0,
}
PROBE_SERVER_P99_MS: float | None = None
CACHE_HIT_SERVER_P99_MS: float | None = None
RELOAD_P99_RATIO: float | None = None
RSS_GROWTH = 1.05
RENDER_P99_MS = 5.0
HANDLER_SHARE = 0.02


@dataclass(frozen=True)
class Row:
    """One key figure: its value (None when not measured), the goal and whether it is met."""

    area: str
    figure: str
    value: float | None
    shown: str
    goal: str
    met: bool | None


def _get(data: dict[str, Any] | None, *keys: str | int) -> Any:
    """``data[k1][k2]...``, or None when any level is missing."""
    value: Any = data
    for key in keys:
        if isinstance(value, dict) and isinstance(key, str):
            value = value.get(key)
        elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
            value = value[key]
        else:
            return None
    return value


def _at_least(floor: float | None) -> Callable[[float], bool] | None:
    return None if floor is None else (lambda value: value >= floor)


def _at_most(ceiling: float | None) -> Callable[[float], bool] | None:
    return None if ceiling is None else (lambda value: value <= ceiling)


def _goal(sign: str, limit: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if limit is None else f"{sign} {fmt.format(limit)}"


def _below(ceiling: float) -> Callable[[float], bool]:
    return lambda value: value < ceiling


def _row(
    area: str,
    figure: str,
    value: Any,
    goal: str,
    ok: Callable[[float], bool] | None,
    fmt: str = "{:.2f}",
) -> Row:
    """``ok`` None: a figure shown for scale, with no goal of its own."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return Row(area, figure, None, "-", goal, None)
    number = float(value)
    return Row(area, figure, number, fmt.format(number), goal, None if ok is None else ok(number))


def serving_rows(serving: dict[str, Any] | None) -> list[Row]:
    rows: list[Row] = []
    by_member = {r["member"]: r for r in _get(serving, "throughput") or [] if "member" in r}
    for member, floor in VS_DIRECT_GOAL.items():
        for c in (1, 4):
            rows.append(
                _row(
                    "throughput",
                    f"{member} c={c} vs direct",
                    _get(by_member.get(member), f"c{c}_vs_direct"),
                    _goal(">=", floor),
                    _at_least(floor),
                )
            )
            rows.append(
                _row(
                    "throughput",
                    f"{member} c={c} vs peer",
                    _get(by_member.get(member), f"c{c}_vs_peer"),
                    _goal(">=", VS_PEER_GOAL[member]),
                    _at_least(VS_PEER_GOAL[member]),
                )
            )
    probes = _get(serving, "latency_under_load") or {}
    for path in ("/v1/models", "/health/live", "/health/ready", "/health/llm/all"):
        rows.append(
            _row(
                "under load",
                f"{path} p99, client (ms)",
                _get(probes, path, "p99_ms"),
                _goal("<", PROBE_CLIENT_P99_MS[path], "{:.0f}"),
                _at_most(PROBE_CLIENT_P99_MS[path]),
                "{:.1f}",
            )
        )
        rows.append(
            _row(
                "under load",
                f"{path} p99, in server (ms)",
                _get(probes, path, "server_p99_ms"),
                _goal("<", PROBE_SERVER_P99_MS, "{:.0f}"),
                _at_most(PROBE_SERVER_P99_MS),
            )
        )
    cache = _get(serving, "cache")
    rows.append(
        _row(
            "cache",
            "hit p99, in server (ms)",
            _get(cache, "hit", "server_p99_ms"),
            _goal("<", CACHE_HIT_SERVER_P99_MS, "{:.0f}"),
            _at_most(CACHE_HIT_SERVER_P99_MS),
        )
    )
    miss_p50 = _get(cache, "miss", "server_p50_ms")
    rows.append(
        _row(
            "cache",
            "miss p50 / hit p50 (in server)",
            _get(cache, "miss_vs_hit_p50"),
            "(for scale)" if miss_p50 is None else f"(for scale: miss p50 {miss_p50:.1f} ms)",
            None,
            "{:.0f}x",
        )
    )
    expected = _get(cache, "workload", "expected_hit_rate")
    floor = float(expected) if isinstance(expected, int | float) else 0.9
    rows.append(
        _row(
            "cache",
            "hit rate, 50 prompts repeated",
            _get(cache, "workload", "hit_rate"),
            # Every first sight of a prompt misses, every repeat must hit.
            f">= {floor:.3f} (repeats)",
            _at_least(floor - 1e-9),
            "{:.3f}",
        )
    )
    return rows


def reload_rows(reload: dict[str, Any] | None) -> list[Row]:
    bound = _get(reload, "peak_bound_mb")
    after = _get(reload, "reloads")
    return [
        _row(
            "reload",
            "failed requests during reloads",
            _get(reload, "failed_requests"),
            "0",
            _at_most(0),
            "{:.0f}",
        ),
        _row(
            "reload",
            "p99 during / p99 before",
            _get(reload, "p99_ratio"),
            _goal("<=", RELOAD_P99_RATIO, "{:.1f}"),
            _at_most(RELOAD_P99_RATIO),
        ),
        _row(
            "reload",
            "peak RSS (MiB)",
            _get(reload, "peak_rss_mb"),
            "<= steady + 1.1 copy" + ("" if bound is None else f" = {bound:.0f}"),
            _at_most(bound if isinstance(bound, int | float) else -1.0),
            "{:.0f}",
        ),
        _row(
            "reload",
            f"RSS after {after or 'N'} / after 1 reload",
            _get(reload, "rss_last_vs_first"),
            f"<= {RSS_GROWTH:.2f}",
            _at_most(RSS_GROWTH),
            "{:.3f}",
        ),
    ]


def metrics_rows(metrics: dict[str, Any] | None) -> list[Row]:
    return [
        _row(
            "metrics",
            "render p99, in process (ms)",
            _get(metrics, "render_in_process", "p99_ms"),
            f"< {RENDER_P99_MS:.0f}",
            _below(RENDER_P99_MS),
        ),
        _row(
            "metrics",
            "GET /health/metrics p99, in server (ms)",
            _get(metrics, "render_live", "server_p99_ms"),
            f"< {RENDER_P99_MS:.0f}",
            _below(RENDER_P99_MS),
        ),
        _row(
            "metrics",
            "metrics view share of a request",
            _get(metrics, "handler_share_of_request"),
            f"< {HANDLER_SHARE:.0%}",
            _below(HANDLER_SHARE),
            "{:.2%}",
        ),
    ]


def _verdict(row: Row) -> str:
    if row.value is None:
        return "-"
    return "" if row.met is None else ("ok" if row.met else "MISSED")


def text_table(rows: list[Row]) -> str:
    header = ("area", "figure", "value", "goal", "")
    cells = [header, *((r.area, r.figure, r.shown, r.goal, _verdict(r)) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = []
    for n, cell in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| area | figure | value | goal | |", "|---|---|---|---|---|"]
    lines += [
        f"| {r.area} | {r.figure} | {r.shown} | {r.goal} | {_verdict(r)} |".replace(
            "<=", "≤"
        ).replace(">=", "≥")
        for r in rows
    ]
    return "\n".join(lines)


def _machine(loaded: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The machine the results came from: one when every file agrees, else each file's."""
    machines = {name: data["machine"] for name, data in loaded.items() if "machine" in data}
    platforms = {json.dumps(m.get("platform")) for m in machines.values()}
    if len(platforms) > 1:
        return {"by_source": machines}
    merged: dict[str, Any] = {}
    for machine in machines.values():
        merged |= {k: v for k, v in machine.items() if k not in merged}
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the JSONs")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args()

    loaded: dict[str, dict[str, Any]] = {}
    sources: dict[str, Any] = {}
    for name in SOURCES:
        path = args.results / f"{name}.json"
        if path.is_file():
            loaded[name] = json.loads(path.read_text())
            modified = time.gmtime(path.stat().st_mtime)
            sources[name] = {
                "file": path.name,
                # The run's own timestamp where it wrote one, else the file's.
                "measured_at": loaded[name].get("when")
                or time.strftime("%Y-%m-%dT%H:%M:%SZ", modified),
            }
    if not loaded:
        sys.exit(f"no results in {args.results}: run nox -s bench first")
    rows = [
        *serving_rows(loaded.get("serving")),
        *reload_rows(loaded.get("reload")),
        *metrics_rows(loaded.get("metrics")),
    ]
    missing = [name for name in SOURCES if name not in loaded]
    print(f"Benchmark summary from {', '.join(f'{n}.json' for n in loaded)} in {args.results}")
    if missing:
        print(f"(not found: {', '.join(f'{n}.json' for n in missing)}; their rows show -)")
    print()
    print(text_table(rows))
    if args.markdown:
        print()
        print(markdown_table(rows))
    merged = {
        "serving": loaded.get("serving"),
        "reload": loaded.get("reload"),
        "metrics": loaded.get("metrics"),
        "machine": _machine(loaded),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": sources,
        "summary": [asdict(r) for r in rows],
    }
    output = args.results / "latest.json"
    output.write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
    missed = [r for r in rows if r.met is False]
    print(f"\n{len(missed)} of {sum(r.met is not None for r in rows)} goals missed")
    print(f"written to {output}")
    if args.check and missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
