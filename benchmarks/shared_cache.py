"""The shared (Redis) response cache against per-replica in-memory caches, same run.

Measures, with real ``ensemble-ops serve`` processes and a real ``redis-server``:

1. the hit share of one repeated-prompt workload (``--requests`` deterministic requests over
   ``--distinct`` prompts, sent round-robin to 3 replicas, as a load balancer would), once
   with each replica's own in-memory cache and once with all three sharing Redis;
2. the app's own time (``Server-Timing``) of a hit from memory against a hit from Redis;
3. what a Redis that stops answering costs: one operation that times out
   (``cache.timeout_s``, p50/p99 over fresh clients), and the app's time of misses while
   Redis is frozen against misses while it answers (after the first timeout the backend is
   skipped for a second, so an outage costs one timeout per second, not one per request).

Needs Debian's ``redis-server``. Writes ``benchmarks/results/shared_cache.json``.
Run with ``python -m benchmarks.shared_cache`` (part of ``nox -s bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import (
    RESULTS_DIR,
    Server,
    redis_server,
    save,
    server_ms,
    spread,
)
from ensemble_ops.config import CacheSettings
from ensemble_ops.events import EventBus
from ensemble_ops.serving.cache.redis_cache import RedisCache
from ensemble_ops.serving.demo import ensure_demo_models

RESULTS = RESULTS_DIR / "shared_cache.json"
MEMBER = "demo-tiny"
REPLICAS = 3


def _body(prompt: str) -> dict[str, Any]:
    return {"model": MEMBER, "prompt": prompt, "max_tokens": 8, "temperature": 0}


def _send(client: httpx.Client, url: str, prompt: str) -> tuple[str, float]:
    """X-Cache and the app's own time (ms) of one request."""
    response = client.post(f"{url}/v1/completions", json=_body(prompt))
    if response.status_code != 200:
        raise RuntimeError(f"answered {response.status_code}: {response.text}")
    app_ms = server_ms(response.headers)
    assert app_ms is not None, "no Server-Timing header"
    return response.headers.get("x-cache", ""), app_ms


@contextlib.contextmanager
def replicas(
    models: dict[str, Path], workdir: Path, count: int, cache: dict[str, Any]
) -> Iterator[list[str]]:
    """``count`` servers sharing nothing but ``cache``'s settings; their URLs."""
    with contextlib.ExitStack() as running:
        urls = []
        for i in range(count):
            folder = workdir / f"replica-{i}-{cache['backend']}"
            folder.mkdir()
            urls.append(
                running.enter_context(Server.start(folder, models, sections={"cache": cache})).url
            )
        yield urls


def hit_share(urls: list[str], requests: int, distinct: int, seed: int) -> dict[str, Any]:
    """The HIT share of ``requests`` drawn from ``distinct`` prompts, sent round-robin."""
    rng = random.Random(seed)
    pool = [f"Repeated question {i} for the fleet's cache" for i in range(distinct)]
    drawn = [rng.choice(pool) for _ in range(requests)]
    with httpx.Client(timeout=60) as client:
        states = [_send(client, urls[i % len(urls)], p)[0] for i, p in enumerate(drawn)]
    hits = states.count("HIT")
    return {
        "requests": requests,
        "distinct_drawn": len(set(drawn)),
        "hits": hits,
        "hit_share": hits / requests,
    }


def hit_latency(url: str, hits: int) -> dict[str, float]:
    """The app's time of ``hits`` hits on one prompt (after the miss that stores it)."""
    with httpx.Client(timeout=60) as client:
        _send(client, url, "The latency benchmark asks this every time")
        times = []
        for _ in range(hits):
            state, app_ms = _send(client, url, "The latency benchmark asks this every time")
            assert state == "HIT", state
            times.append(app_ms)
    return spread(times)


async def one_timeout_ms(url: str, samples: int, timeout_s: float) -> dict[str, float]:
    """A GET on a frozen Redis, each from a fresh client (a client that has failed skips
    Redis for a second, which would hide the timeout)."""
    settings = CacheSettings.model_validate(
        {"backend": "redis", "url": url, "timeout_s": timeout_s}
    )
    times = []
    for _ in range(samples):
        cache = RedisCache(settings, EventBus())
        started = time.perf_counter()
        assert await cache.get("frozen") is None
        times.append((time.perf_counter() - started) * 1000)
        await cache.aclose()
    return spread(times)


def misses_ms(url: str, count: int, tag: str) -> dict[str, float]:
    """The app's time of ``count`` misses (prompts never sent before)."""
    with httpx.Client(timeout=60) as client:
        times = [_send(client, url, f"{tag} miss {i} asks something new")[1] for i in range(count)]
    return spread(times, peak=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--distinct", type=int, default=50)
    parser.add_argument("--hits", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shared-cache-") as tmp:
        workdir = Path(tmp)
        paths = ensure_demo_models(workdir / "models")
        models = {MEMBER: paths[MEMBER]}
        result: dict[str, Any] = {"member": MEMBER, "replicas": REPLICAS}
        with redis_server(workdir) as redis:
            redis_cache = {"backend": "redis", "url": redis.url}
            for name, cache in (("memory", {"backend": "memory"}), ("redis", redis_cache)):
                with replicas(models, workdir, REPLICAS, cache) as urls:
                    result[f"hit_share_{name}"] = hit_share(
                        urls, args.requests, args.distinct, args.seed
                    )
                    result[f"hit_latency_{name}"] = hit_latency(urls[0], args.hits)
                    if name == "redis":
                        result["misses_redis_up"] = misses_ms(urls[0], 100, "up")
                        with redis.frozen():
                            result["misses_redis_frozen"] = misses_ms(urls[0], 100, "frozen")
                            result["one_timeout"] = asyncio.run(
                                one_timeout_ms(redis.url, 50, CacheSettings().timeout_s)
                            )
    memory, shared = result["hit_share_memory"], result["hit_share_redis"]
    result["hit_share_redis_vs_memory"] = shared["hit_share"] / memory["hit_share"]
    result["redis_hit_vs_memory_hit_p50"] = (
        result["hit_latency_redis"]["p50_ms"] / result["hit_latency_memory"]["p50_ms"]
    )
    print(json.dumps(result, indent=2))
    save(args.output, result)


if __name__ == "__main__":
    main()
