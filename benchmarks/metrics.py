"""Metrics benchmark: render time, and the cost of metrics per request (on vs off).

1. Render time of the Prometheus exposition with 3 members x 3 modes x 3 statuses and every
   other series populated (in-process, 2,000 renders; goal p99 under 5 ms), and of
   ``GET /health/metrics`` on a live server (Server-Timing, the app's own time).
2. Throughput of 16-token completions on the smallest demo member with ``metrics.enabled``
   true and false, alternating rounds in one run; the overhead is 1 - on/off (goal under 2%).
   The in-process cost of the metrics view per request (its event handlers) is also timed.

Prints a table and writes ``benchmarks/results/metrics.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from benchmarks.harness import (
    RESULTS_DIR,
    ProbeSampler,
    Server,
    completion_load,
    machine,
    median,
    save,
    spread,
)
from ensemble_ops.events import EventBus, InferenceFinished
from ensemble_ops.observability.metrics import Metrics
from ensemble_ops.serving.demo import ensure_demo_models

RESULTS = RESULTS_DIR / "metrics.json"
MEMBERS = ["demo-tiny", "demo-small", "demo-base"]
MODES = ["fast", "balanced", "creative"]


def populated() -> tuple[Metrics, EventBus]:
    bus = EventBus()
    metrics = Metrics(enabled=True, members=MEMBERS)
    metrics.subscribe(bus)
    for member in MEMBERS:
        for mode in MODES:
            for outcome in ("success", "cancelled"):
                bus.publish(
                    InferenceFinished(
                        member,
                        mode,
                        0.3,
                        10,
                        16,
                        cached=False,
                        stream=True,
                        outcome=outcome,
                        time_to_first_token_s=0.05,
                        engine_s=0.2,
                    )
                )
            metrics.record_request(member, mode, "error")
            metrics.record_error(member, "engine_error")
    return metrics, bus


def render_times(samples: int) -> dict[str, float]:
    metrics, _ = populated()
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        metrics.render([])
        times.append((time.perf_counter() - started) * 1000)
    return spread(times) | {"series_lines": float(metrics.render([])[0].count(b"\n"))}


def handler_cost_us(samples: int) -> float:
    """Microseconds the metrics view spends on one finished request's event."""
    _, bus = populated()
    event = InferenceFinished(
        "demo-tiny", "fast", 0.01, 5, 16, cached=False, stream=False, engine_s=0.008
    )
    started = time.perf_counter()
    for _ in range(samples):
        bus.publish(event)
    return (time.perf_counter() - started) / samples * 1e6


def live_render(url: str, samples: int) -> dict[str, float]:
    """The app's own time (Server-Timing) of ``samples`` GETs of /health/metrics."""
    sampler = ProbeSampler(url, ["/health/metrics"], every_s=0, rounds=samples, timeout_s=30)
    inside = [s.server_ms for s in sampler.run()["/health/metrics"] if s.server_ms is not None]
    if len(inside) < samples:
        raise RuntimeError("/health/metrics answered without Server-Timing")
    return spread(inside, prefix="server_")


async def throughput(url: str, requests: int) -> float:
    """Requests per second of 16-token completions on demo-tiny, one client."""
    run = await completion_load(url, "demo-tiny", requests=requests, concurrency=1, max_tokens=16)
    if run.failed:
        raise RuntimeError(f"{run.failed} requests failed during the throughput run")
    return run.requests_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON file")
    args = parser.parse_args()
    render = render_times(2000)
    handler_us = handler_cost_us(20000)
    on_rates: list[float] = []
    off_rates: list[float] = []
    live: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = ensure_demo_models(workdir / "models")
        tiny = {"demo-tiny": models["demo-tiny"]}
        for _ in range(args.rounds):
            for enabled, rates in ((True, on_rates), (False, off_rates)):
                metrics = {"metrics": {"enabled": enabled}}
                with Server.start(workdir, tiny, sections=metrics) as server:
                    rates.append(asyncio.run(throughput(server.url, args.requests)))
                    if enabled and not live:
                        live = live_render(server.url, 300)
    on, off = median(on_rates), median(off_rates)
    request_us = 1e6 / on
    result = {
        "render_in_process": render,
        "render_live": live,
        "throughput_on_rps": on_rates,
        "throughput_off_rps": off_rates,
        "median_on_vs_off": on / off,
        "metrics_handler_us_per_request": handler_us,
        "handler_share_of_request": handler_us / request_us,
        "machine": machine(),
    }
    print(
        f"\nrender ({render['series_lines']:.0f} lines): p50 {render['p50_ms']:.2f} ms, "
        f"p99 {render['p99_ms']:.2f} ms in-process; live /health/metrics in-app p50 "
        f"{live['server_p50_ms']:.2f} ms, p99 {live['server_p99_ms']:.2f} ms"
    )
    print(
        f"demo-tiny c=1 req/s, metrics on {[round(r) for r in on_rates]}, off "
        f"{[round(r) for r in off_rates]}: median on/off {on / off:.3f}"
    )
    print(
        f"metrics view per request: {handler_us:.1f} us = {handler_us / request_us:.2%} of a "
        f"{request_us / 1000:.2f} ms request"
    )
    save(args.output, result)


if __name__ == "__main__":
    main()
