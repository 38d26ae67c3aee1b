"""Status page benchmark: what the event stream costs, what the page weighs, how fast it
shows a reload.

- **Cost of the event stream**: a demo-tiny completion in-process (the request overhead the
  stream could add), with 10 followers of ``/events`` draining their queues as the route
  does, against none; medians of interleaved rounds, and the fan-out's own time per event
  measured alone (goal: < 1% of a demo-tiny request).
- **Page weight**: the page, its script and its stylesheet, as sent (no compression).
- **Reload to page**: 10 reloads of demo-tiny on a real server while headless Chromium
  shows the page; for each state change, the time from the event to its drawing (the page
  records it against the event's timestamp), p95 (goal < 500 ms).

Prints a table and writes ``benchmarks/results/status_page.json``.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
from asgi_lifespan import LifespanManager

from benchmarks.browser import chromium, open_page
from benchmarks.harness import RESULTS_DIR, Server, machine, percentile, save, utc_now
from ensemble_ops.events import ReloadProgressed
from ensemble_ops.http.app import create_app
from ensemble_ops.serving.builtin import demo_settings
from ensemble_ops.serving.demo import ensure_demo_models

RESULTS = RESULTS_DIR / "status_page.json"
FOLLOWERS = 10
ROUNDS, PER_ROUND = 7, 40


async def stream_cost(directory: Path) -> dict[str, Any]:
    app = create_app(demo_settings(directory, environ={}))
    async with LifespanManager(app) as manager:
        await app.state.ensemble.loading_done.wait()
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def requests() -> float:
                latencies = []
                for i in range(PER_ROUND):
                    body = {"model": "demo-tiny", "prompt": f"x {i}", "max_tokens": 4}
                    started = time.perf_counter()
                    answer = await client.post("/v1/completions", json=body | {"temperature": 0.8})
                    latencies.append(time.perf_counter() - started)
                    answer.raise_for_status()
                return statistics.median(latencies)

            feed = app.state.events
            without, with_followers = [], []
            await requests()  # warm
            for _ in range(ROUNDS):
                without.append(await requests())
                async with anyio.create_task_group() as tasks:
                    followers = [feed.follow() for _ in range(FOLLOWERS)]
                    for follower in followers:
                        tasks.start_soon(_drain, follower)
                    with_followers.append(await requests())
                    for follower in followers:
                        follower.end("closing")
                        feed.leave(follower)
            publish_us = _publish_cost(app)
    request_s = statistics.median(without)
    return {
        "request_s_without": round(request_s, 6),
        "request_s_with_10": round(statistics.median(with_followers), 6),
        "ratio": round(statistics.median(with_followers) / request_s, 4),
        "fan_out_us_per_event_10": round(publish_us, 2),
        "fan_out_share_of_request": round(publish_us / 1e6 / request_s, 6),
    }


async def _drain(follower: Any) -> None:
    while follower.ended is None:
        await follower.next_batch(15)


def _publish_cost(app: Any) -> float:
    """Microseconds per event published with FOLLOWERS followers (queues drained between)."""
    feed, bus = app.state.events, app.state.bus
    followers = [feed.follow() for _ in range(FOLLOWERS)]
    event = ReloadProgressed("demo-tiny", "warming_up", 40.0, "Warmup iteration 1/3")
    started, count = time.perf_counter(), 0
    for _ in range(20):
        for _ in range(500):
            bus.publish(event)
        count += 500
        for follower in followers:
            follower.pending.clear()
    elapsed = time.perf_counter() - started
    for follower in followers:
        feed.leave(follower)
    return elapsed / count * 1e6


def page_weight(url: str) -> dict[str, int]:
    sizes = {
        path: len(httpx.get(f"{url}{path}").content)
        for path in ("/", "/status/app.js", "/status/app.css")
    }
    return {**sizes, "total": sum(sizes.values())}


def reload_to_page(server: Server, reloads: int) -> dict[str, Any]:
    with chromium() as driver:
        open_page(driver, server.url, len(server.members))
        driver.execute_script("statusPage.renderLatenciesMs = []")
        for _ in range(reloads):
            httpx.post(f"{server.admin_url}/admin/models/demo-tiny/reload", timeout=30)
            while httpx.get(f"{server.url}/health/llm/reload/demo-tiny").json()["state"] not in (
                "completed",
                "failed",
            ):
                time.sleep(0.05)
            time.sleep(0.3)  # the last state's drawing
        latencies: list[float] = driver.execute_script("return statusPage.renderLatenciesMs")
    return {
        "state_changes": len(latencies),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p95_ms": round(percentile(latencies, 95), 1),
        "max_ms": round(max(latencies), 1),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        paths = ensure_demo_models(workdir)
        cost = asyncio.run(stream_cost(workdir))
        with Server.start(workdir, paths) as server:
            weight = page_weight(server.url)
            shown = reload_to_page(server, 10)
    result = {
        "machine": machine(),
        "when": utc_now(),
        "stream_cost": cost,
        "page_bytes": weight,
        "reload_to_page": shown,
    }
    save(RESULTS, result)
    share = cost["fan_out_share_of_request"]
    print(f"event stream, 10 followers: a request x{cost['ratio']} against none")
    print(f"fan-out: {cost['fan_out_us_per_event_10']} us per event, {share:.4%} of a request")
    print(f"page weight: {weight['total'] / 1024:.1f} KiB ({weight})")
    print(
        f"reload state change to the page: p50 {shown['p50_ms']} ms, "
        f"p95 {shown['p95_ms']} ms over {shown['state_changes']} changes"
    )


if __name__ == "__main__":
    main()
