"""Serving benchmark: ensemble-ops against direct llama_cpp calls and a peer, same run.

Measures, on whatever machine runs it:

1. throughput of ``/v1/completions`` on each demo member (16-token completions, concurrency
   1 and 4) as a ratio to calling the same llama_cpp model directly, in-process, with the
   same prompts and settings, and to the peer ``python -m llama_cpp.server`` (from
   ``llama-cpp-python[server]``) serving the same file with the same n_ctx and threads;
2. latency of ``GET /v1/models`` and of the health probes (``/health/live``,
   ``/health/ready``, ``/health/llm/all``) while every member is saturated, next to the
   peer's ``/v1/models`` while its model is saturated;
3. the response cache on demo-base: the app's own time (``Server-Timing``) for a hit against
   a miss, and the hit rate (``X-Cache``) of a workload that repeats 50 prompts.

Prints tables and writes ``benchmarks/results/serving.json`` (``benchmarks/report.py`` merges
it with the other results into ``latest.json``). Run with ``nox -s bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    N_CTX,
    PROMPTS,
    RESULTS_DIR,
    ProbeSample,
    ProbeSampler,
    Record,
    Server,
    closed_loop,
    completion_bodies,
    completion_load,
    direct_run,
    in_process,
    llama_cpp_server,
    machine,
    percentile,
    save,
    server_ms,
    spread,
    until,
    utc_now,
)
from ensemble_ops.serving.demo import DEMO_MEMBERS, ensure_demo_models

RESULTS = RESULTS_DIR / "serving.json"
MAX_TOKENS = 16
PROBES = ["/v1/models", "/health/live", "/health/ready", "/health/llm/all"]
PROBE_GAP_S = 0.01  # the probes' pace: at most one GET per 10 ms, paths in turn
CACHE_MEMBER = "demo-base"
CACHE_DISTINCT = 50  # prompts of the repeated workload


def direct_throughput(path: Path, requests: int, threads: int | None) -> float:
    """Requests per second calling llama_cpp in-process, one after another (its limit)."""
    with in_process(path, threads=threads) as llm:
        bodies = completion_bodies(None, MAX_TOKENS, requests)
        warmup = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS}
        return direct_run(llm, bodies, warmup=warmup).requests_per_s


async def http_throughput(url: str, member: str, requests: int, concurrency: int) -> float:
    """Requests per second through the server with ``concurrency`` clients."""
    run = await completion_load(
        url, member, requests=requests, concurrency=concurrency, max_tokens=MAX_TOKENS
    )
    if run.failed:
        raise RuntimeError(f"{run.failed} requests failed during the throughput run")
    return run.requests_per_s


def _probe_figures(path: str, samples: list[ProbeSample]) -> dict[str, float]:
    """Client p50/p99/max, and the app's own p50/p99 where it reports them (ensemble-ops)."""
    refused = {s.status for s in samples if s.status != 200}
    if refused:
        raise RuntimeError(f"{path} answered {refused}")
    inside = [s.server_ms for s in samples if s.server_ms is not None]
    figures = spread([s.client_ms for s in samples], peak=True)
    return figures | (spread(inside, prefix="server_") if inside else {})


async def probe_latency_under_load(
    url: str, members: list[str | None], paths: list[str], samples: int
) -> dict[str, dict[str, float]]:
    """p50/p99/max of GET ``paths`` while two clients per member keep it generating."""
    stop = asyncio.Event()
    loads = [
        asyncio.create_task(closed_loop(url, until(stop, completion_bodies(m, 64)), concurrency=2))
        for m in members
    ]
    await asyncio.sleep(1.0)
    sampler = ProbeSampler(
        url, paths, every_s=PROBE_GAP_S * len(paths), rounds=samples, timeout_s=60
    )
    try:
        probes = await asyncio.to_thread(sampler.run)
    finally:
        stop.set()
        await asyncio.gather(*loads)
    return {path: _probe_figures(path, got) for path, got in probes.items()}


def cache_scenario(
    url: str, *, hits: int, misses: int, workload: int, distinct: int, seed: int
) -> dict[str, Any]:
    """Server time of a cache hit against a miss, and the hit rate of a repeated workload.

    One client, one request at a time on an otherwise idle server: each figure is the
    cache's, not a queue's. Identical requests sent at the same moment would all miss (the
    cache does not coalesce them), so sequential requests also make the hit rate exact.
    """

    def send(prompts: list[str]) -> list[Record]:
        bodies = (
            {"model": CACHE_MEMBER, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}
            for p in prompts
        )
        run = asyncio.run(closed_loop(url, bodies, concurrency=1))
        if run.failed:
            raise RuntimeError(f"{run.failed} cache requests failed")
        if any(server_ms(r.headers) is None for r in run.records):
            raise RuntimeError("no Server-Timing: app;dur=<ms> header in the response")
        return run.records

    def app_ms(records: list[Record]) -> list[float]:
        return [server_ms(r.headers) or 0.0 for r in records]

    def x_cache(records: list[Record]) -> list[str]:
        return [r.headers.get("x-cache", "") for r in records]

    # (a) one warm-up request fills the cache, then the same request again and again.
    warm, *hit = send(["The cache benchmark asks the same question every time"] * (hits + 1))
    # Misses: deterministic requests the server has never seen, one prompt each.
    missed = send([f"Cold cache request {i} asks something new" for i in range(misses)])
    # (b) a workload that repeats: ``workload`` requests over ``distinct`` prompts.
    rng = random.Random(seed)
    pool = [f"Repeated question {i} about the ensemble's cache" for i in range(distinct)]
    drawn = [rng.choice(pool) for _ in range(workload)]
    states = x_cache(send(drawn))
    hit_p50 = percentile(app_ms(hit), 50)
    miss_p50 = percentile(app_ms(missed), 50)
    workload_hits = states.count("HIT")
    return {
        "model": CACHE_MEMBER,
        "max_tokens": MAX_TOKENS,
        "warmup_x_cache": x_cache([warm])[0],
        "hit": {"requests": hits, "not_hit": sum(s != "HIT" for s in x_cache(hit))}
        | spread(app_ms(hit), prefix="server_", peak=True)
        | spread([r.latency_s * 1000 for r in hit], prefix="client_"),
        "miss": {"requests": misses, "not_miss": sum(s != "MISS" for s in x_cache(missed))}
        | spread(app_ms(missed), prefix="server_"),
        "miss_vs_hit_p50": miss_p50 / hit_p50 if hit_p50 > 0 else None,
        "workload": {
            "requests": workload,
            "distinct_prompts": distinct,
            "distinct_drawn": len(set(drawn)),
            "seed": seed,
            "hits": workload_hits,
            "misses": states.count("MISS"),
            "hit_rate": workload_hits / workload,
            # Every first sight of a prompt misses; every repeat should hit.
            "expected_hit_rate": 1 - len(set(drawn)) / workload,
        },
    }


def peer_figures(
    models: dict[str, Path], requests: int, threads: int | None, samples: int, workdir: Path
) -> tuple[dict[tuple[str, int], float], dict[str, dict[str, float]]]:
    """The peer's throughput on each member, and its /v1/models latency under load."""
    peer: dict[tuple[str, int], float] = {}
    peer_probe: dict[str, dict[str, float]] = {}
    for name, path in models.items():
        with llama_cpp_server(path, threads=threads, workdir=workdir) as server:
            if server is None:
                break
            for c in (1, 4):
                peer[(name, c)] = asyncio.run(http_throughput(server.url, name, requests, c))
            if name == DEMO_MEMBERS[-1].name:
                # Its one model saturated by 4 clients, like each of ours by 2 (x3).
                peer_probe = asyncio.run(
                    probe_latency_under_load(server.url, [None, None], ["/v1/models"], samples)
                )
    return peer, peer_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200, help="per throughput cell")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    parser.add_argument("--samples", type=int, default=300, help="probe samples per path")
    parser.add_argument("--no-peer", action="store_true", help="skip llama_cpp.server")
    parser.add_argument("--cache-hits", type=int, default=300, help="identical cached requests")
    parser.add_argument("--cache-misses", type=int, default=30, help="cold cached requests")
    parser.add_argument(
        "--cache-workload",
        type=int,
        default=500,
        help=f"requests over {CACHE_DISTINCT} repeated prompts",
    )
    parser.add_argument("--seed", type=int, default=0, help="of the repeated workload")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = ensure_demo_models(workdir / "models")
        direct = {
            name: direct_throughput(path, args.requests, args.threads)
            for name, path in models.items()
        }
        with Server.start(workdir, models, threads=args.threads) as server:
            served = {
                (name, c): asyncio.run(http_throughput(server.url, name, args.requests, c))
                for name in models
                for c in (1, 4)
            }
            probes = asyncio.run(
                probe_latency_under_load(server.url, list(models), PROBES, args.samples)
            )
            cache = cache_scenario(
                server.url,
                hits=args.cache_hits,
                misses=args.cache_misses,
                workload=args.cache_workload,
                distinct=CACHE_DISTINCT,
                seed=args.seed,
            )
        peer, peer_probe = (
            ({}, {})
            if args.no_peer
            else peer_figures(models, args.requests, args.threads, args.samples, workdir)
        )

    rows = []
    print(
        f"\n{'member':<12}{'direct':>9}{'c=1':>9}{'/direct':>9}{'/peer':>8}"
        f"{'c=4':>9}{'/direct':>9}{'/peer':>8}   (req/s, ratios)"
    )
    for name, rate in direct.items():
        one, four = served[(name, 1)], served[(name, 4)]
        row: dict[str, Any] = {
            "member": name,
            "direct_rps": rate,
            "c1_rps": one,
            "c4_rps": four,
            "c1_vs_direct": one / rate,
            "c4_vs_direct": four / rate,
        }
        if peer:
            row |= {
                "peer_c1_rps": peer[(name, 1)],
                "peer_c4_rps": peer[(name, 4)],
                "c1_vs_peer": one / peer[(name, 1)],
                "c4_vs_peer": four / peer[(name, 4)],
            }
        rows.append(row)
        vs_peer1 = f"{row['c1_vs_peer']:>8.2f}" if peer else f"{'-':>8}"
        vs_peer4 = f"{row['c4_vs_peer']:>8.2f}" if peer else f"{'-':>8}"
        print(
            f"{name:<12}{rate:>9.1f}{one:>9.1f}{one / rate:>9.2f}{vs_peer1}"
            f"{four:>9.1f}{four / rate:>9.2f}{vs_peer4}"
        )
    print("\nLatency while every member is saturated (ms; 'in server' from Server-Timing):")
    print(f"{'path':<28}{'p50':>8}{'p99':>8}{'max':>8}{'in server p50':>15}{'p99':>7}")
    for label, table in (("ensemble-ops", probes), ("peer", peer_probe)):
        for route, f in table.items():
            inner = (
                f"{f['server_p50_ms']:>15.2f}{f['server_p99_ms']:>7.2f}"
                if "server_p50_ms" in f
                else ""
            )
            print(
                f"{label + ' ' + route:<28}{f['p50_ms']:>8.1f}{f['p99_ms']:>8.1f}"
                f"{f['max_ms']:>8.1f}{inner}"
            )
    hit, miss, repeated = cache["hit"], cache["miss"], cache["workload"]
    print(f"\nResponse cache on {CACHE_MEMBER} (ms of app time, from Server-Timing):")
    print(
        f"  hit  p50 {hit['server_p50_ms']:.2f}  p99 {hit['server_p99_ms']:.2f}  "
        f"({hit['requests']} identical requests, {hit['not_hit']} not HIT; client p50 "
        f"{hit['client_p50_ms']:.2f}, p99 {hit['client_p99_ms']:.2f})"
    )
    ratio = cache["miss_vs_hit_p50"]
    print(
        f"  miss p50 {miss['server_p50_ms']:.2f}  p99 {miss['server_p99_ms']:.2f}  "
        f"({miss['requests']} cold requests, {miss['not_miss']} not MISS): miss/hit p50 "
        + (f"{ratio:.0f}x" if ratio is not None else "-")
    )
    print(
        f"  hit rate {repeated['hit_rate']:.3f} over {repeated['requests']} requests drawn "
        f"from {repeated['distinct_prompts']} prompts (expected "
        f"{repeated['expected_hit_rate']:.3f})"
    )
    result = {
        "machine": machine(),
        "settings": {
            "requests": args.requests,
            "max_tokens": MAX_TOKENS,
            "threads": args.threads,
            "n_ctx": N_CTX,
            "probe_samples": args.samples,
            "cache_hits": args.cache_hits,
            "cache_misses": args.cache_misses,
            "cache_workload": args.cache_workload,
            "seed": args.seed,
        },
        "throughput": rows,
        "latency_under_load": probes,
        "peer_latency_under_load": peer_probe,
        "cache": cache,
        "when": utc_now(),
    }
    save(args.output, result)


if __name__ == "__main__":
    main()
