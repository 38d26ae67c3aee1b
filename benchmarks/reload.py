"""Reload benchmark: zero-downtime reloads of the largest demo member under load.

Starts ``ensemble-ops serve`` on the demo models, keeps four clients sending 16-token
completions to demo-base, and measures in one run:

- failed requests during reloads (goal 0);
- p99 latency during reloads as a ratio to p99 before them, and the longest request;
- peak RSS during a reload against the steady RSS before it (goal: at most the old copy, the
  new copy and 10%, i.e. steady + 1.1 x one copy as llama.cpp sizes it: weights + KV cache);
- RSS after 20 reloads against RSS after 1 (goal within 5%: no leak).

Prints a table and writes ``benchmarks/results/reload.json``. Run with ``nox -s bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import (
    RESULTS_DIR,
    PeakSampler,
    Server,
    closed_loop,
    machine,
    percentile,
    reload_member,
    save,
    until,
)
from ensemble_ops.serving.demo import ensure_demo_models

RESULTS = RESULTS_DIR / "reload.json"
MEMBER = "demo-base"
CLIENTS = 4


async def run(server: Server, reloads: int, baseline_s: float) -> dict[str, Any]:
    """``reloads`` reloads one after another while CLIENTS clients keep sending."""
    stop = asyncio.Event()
    body = {"model": MEMBER, "prompt": "Reload me", "max_tokens": 16, "temperature": 0.8}
    users = asyncio.create_task(
        closed_loop(server.url, until(stop, itertools.repeat(body)), concurrency=CLIENTS)
    )
    async with httpx.AsyncClient(timeout=60) as admin:
        await asyncio.sleep(baseline_s)
        steady_rss = server.rss_bytes()
        before_end = time.perf_counter()
        windows, outcomes, rss_after = [], [], []
        with PeakSampler(server.rss_bytes, 0.005) as sampler:
            for _ in range(reloads):
                done = await reload_member(
                    admin, server.admin_url, MEMBER, poll_s=0.01, timeout_s=600
                )
                if done.outcome not in ("completed", "failed"):
                    raise RuntimeError(f"reload {done.outcome}: {done.error}")
                windows.append((done.started, done.ended))
                outcomes.append(done.outcome)
                await asyncio.sleep(0.2)  # let the old copy's memory go back
                rss_after.append(server.rss_bytes())
        stop.set()
        records = (await users).records

    def during(start: float) -> bool:
        return any(a <= start <= b for a, b in windows)

    before = [r.latency_s for r in records if r.started < before_end]
    in_reload = [r.latency_s for r in records if during(r.started)]
    return {
        "requests": len(records),
        "requests_during_reloads": len(in_reload),
        "failed_requests": sum(r.status != 200 for r in records),
        "reloads": reloads,
        "reload_outcomes": {o: outcomes.count(o) for o in set(outcomes)},
        "reload_seconds_p50": percentile([b - a for a, b in windows], 50),
        "p99_before_ms": percentile(before, 99) * 1000,
        "p99_during_ms": percentile(in_reload, 99) * 1000,
        "p99_ratio": percentile(in_reload, 99) / percentile(before, 99),
        "max_before_ms": max(before) * 1000,
        "max_during_ms": max(in_reload) * 1000,
        "steady_rss_mb": steady_rss / 2**20,
        "peak_rss_mb": (sampler.peak or 0) / 2**20,
        "rss_after_1_mb": rss_after[0] / 2**20,
        "rss_after_last_mb": rss_after[-1] / 2**20,
        "rss_last_vs_first": rss_after[-1] / rss_after[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--baseline-s", type=float, default=5.0)
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = ensure_demo_models(workdir / "models")
        with Server.start(workdir, models) as server:
            # One copy as llama.cpp sizes it: weights plus the KV cache for n_ctx.
            health = httpx.get(f"{server.url}/health/llm", params={"model": MEMBER}).json()
            copy_mb = float(health["memory_mb"])
            result = asyncio.run(run(server, args.reloads, args.baseline_s))
    bound = result["steady_rss_mb"] + copy_mb * 1.1
    result |= {"copy_mb": copy_mb, "peak_bound_mb": bound}
    print(f"\n{args.reloads} reloads of {MEMBER} under {CLIENTS} concurrent clients:")
    print(
        f"  requests {result['requests']} ({result['requests_during_reloads']} during "
        f"reloads), failed {result['failed_requests']}, outcomes {result['reload_outcomes']}"
    )
    print(
        f"  p99 before {result['p99_before_ms']:.1f} ms, during {result['p99_during_ms']:.1f}"
        f" ms: ratio {result['p99_ratio']:.2f}; longest request before "
        f"{result['max_before_ms']:.1f} ms, during {result['max_during_ms']:.1f} ms"
    )
    print(
        f"  RSS steady {result['steady_rss_mb']:.0f} MiB, peak during reloads "
        f"{result['peak_rss_mb']:.0f} MiB (bound: steady + 1.1 x {copy_mb:.0f} MiB copy = "
        f"{bound:.0f} MiB)"
    )
    print(
        f"  RSS after 1 reload {result['rss_after_1_mb']:.0f} MiB, after {args.reloads}: "
        f"{result['rss_after_last_mb']:.0f} MiB (ratio {result['rss_last_vs_first']:.3f})"
    )
    result["machine"] = machine()
    save(args.output, result)


if __name__ == "__main__":
    main()
