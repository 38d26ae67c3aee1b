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
import json
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.serving import _percentile, _stop, start_server
from ensemble_ops.serving.demo import ensure_demo_models

RESULTS = Path(__file__).parent / "results" / "reload.json"
MEMBER = "demo-base"


class RssSampler:
    """Samples a process's RSS every few milliseconds in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def now(self) -> int:
        rss: int = self._process.memory_info().rss
        return rss


async def run(url: str, pid: int, reloads: int, baseline_s: float) -> dict[str, Any]:
    records: list[tuple[float, float, int]] = []  # (start, latency_s, status)
    stop = asyncio.Event()

    async def user(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            response = await client.post(
                f"{url}/v1/completions",
                json={"model": MEMBER, "prompt": "Reload me", "max_tokens": 16, "temperature": 0.8},
            )
            records.append((started, time.perf_counter() - started, response.status_code))

    async def reload_once(client: httpx.AsyncClient) -> tuple[float, float, str]:
        started = time.perf_counter()
        answer = await client.post(f"{url}/admin/models/{MEMBER}/reload")
        if answer.status_code != 202:
            raise RuntimeError(f"reload refused: {answer.status_code} {answer.text}")
        while True:
            status = (await client.get(f"{url}/health/llm/reload/{MEMBER}")).json()
            if status["state"] in ("completed", "failed"):
                return started, time.perf_counter(), status["state"]
            await asyncio.sleep(0.01)

    process = psutil.Process(pid)
    async with httpx.AsyncClient(timeout=60) as users, httpx.AsyncClient(timeout=60) as admin:
        tasks = [asyncio.create_task(user(users)) for _ in range(4)]
        await asyncio.sleep(baseline_s)
        steady_rss = process.memory_info().rss
        before_end = time.perf_counter()
        windows, outcomes, rss_after = [], [], []
        with RssSampler(pid) as sampler:
            for _ in range(reloads):
                start, end, outcome = await reload_once(admin)
                windows.append((start, end))
                outcomes.append(outcome)
                await asyncio.sleep(0.2)  # let the old copy's memory go back
                rss_after.append(process.memory_info().rss)
            peak_rss = sampler.peak
        stop.set()
        await asyncio.gather(*tasks)

    def during(start: float) -> bool:
        return any(a <= start <= b for a, b in windows)

    before = [lat for s, lat, _ in records if s < before_end]
    in_reload = [lat for s, lat, _ in records if during(s)]
    failed = sum(1 for _, _, code in records if code != 200)
    return {
        "requests": len(records),
        "requests_during_reloads": len(in_reload),
        "failed_requests": failed,
        "reloads": reloads,
        "reload_outcomes": {o: outcomes.count(o) for o in set(outcomes)},
        "reload_seconds_p50": _percentile([b - a for a, b in windows], 50),
        "p99_before_ms": _percentile(before, 99) * 1000,
        "p99_during_ms": _percentile(in_reload, 99) * 1000,
        "p99_ratio": _percentile(in_reload, 99) / _percentile(before, 99),
        "max_before_ms": max(before) * 1000,
        "max_during_ms": max(in_reload) * 1000,
        "steady_rss_mb": steady_rss / 2**20,
        "peak_rss_mb": peak_rss / 2**20,
        "rss_after_1_mb": rss_after[0] / 2**20,
        "rss_after_last_mb": rss_after[-1] / 2**20,
        "rss_last_vs_first": rss_after[-1] / rss_after[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--baseline-s", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = ensure_demo_models(workdir / "models")
        process, url = start_server(models, None, workdir)
        try:
            # One copy as llama.cpp sizes it: weights plus the KV cache for n_ctx.
            health = httpx.get(f"{url}/health/llm", params={"model": MEMBER}).json()
            copy_mb = float(health["memory_mb"])
            result = asyncio.run(run(url, process.pid, args.reloads, args.baseline_s))
        finally:
            _stop(process)
    bound = result["steady_rss_mb"] + copy_mb * 1.1
    result |= {"copy_mb": copy_mb, "peak_bound_mb": bound}
    print(f"\n{args.reloads} reloads of {MEMBER} under 4 concurrent clients:")
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
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
