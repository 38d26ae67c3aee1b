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
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from ensemble_ops.serving.demo import DEMO_MEMBERS, ensure_demo_models

RESULTS = Path(__file__).parent / "results" / "serving.json"
PROMPTS = [f"Request number {i} asks the ensemble about the weather" for i in range(64)]
N_CTX = 2048
MAX_TOKENS = 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))
    return ordered[index]


def server_ms(response: httpx.Response) -> float | None:
    """The app's own time for ``response`` from ``Server-Timing: app;dur=<ms>``, if given."""
    for metric in response.headers.get("server-timing", "").split(","):
        name, _, params = metric.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if name == "app" and key == "dur":
                return float(value)
    return None


def direct_throughput(path: Path, requests: int, threads: int | None) -> float:
    """Requests per second calling llama_cpp in-process, one after another (its limit)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    try:
        llm.create_completion(PROMPTS[0], max_tokens=MAX_TOKENS)  # warm-up
        started = time.perf_counter()
        for i in range(requests):
            llm.create_completion(PROMPTS[i % len(PROMPTS)], max_tokens=MAX_TOKENS, temperature=0.8)
        return requests / (time.perf_counter() - started)
    finally:
        llm.close()


async def http_throughput(url: str, member: str, requests: int, concurrency: int) -> float:
    """Requests per second through the server with ``concurrency`` clients."""
    counter = iter(range(requests))
    failures = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        for i in counter:
            body = {
                "model": member,
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": MAX_TOKENS,
                "temperature": 0.8,
            }
            response = await client.post(f"{url}/v1/completions", json=body)
            failures += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await client.post(
            f"{url}/v1/completions",
            json={"model": member, "prompt": "warm", "max_tokens": MAX_TOKENS},
        )
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{failures} requests failed during the throughput run")
    return requests / elapsed


async def probe_latency_under_load(
    url: str, members: list[str | None], paths: list[str], samples: int
) -> dict[str, dict[str, float]]:
    """p50/p99/max of GET ``paths`` while two clients per member keep it generating."""
    stop = asyncio.Event()

    async def load(client: httpx.AsyncClient, member: str | None) -> None:
        body: dict[str, Any] = {"prompt": "busy", "max_tokens": 64, "temperature": 0.8}
        if member is not None:
            body["model"] = member
        while not stop.is_set():
            await client.post(f"{url}/v1/completions", json=body)

    def sample() -> dict[str, dict[str, float]]:
        # Its own thread and connection: the load generator's event loop must not delay it.
        results: dict[str, dict[str, float]] = {}
        with httpx.Client(timeout=60) as probe:
            for path in paths:
                latencies, inside = [], []
                for _ in range(samples):
                    started = time.perf_counter()
                    response = probe.get(f"{url}{path}")
                    latencies.append((time.perf_counter() - started) * 1000)
                    if response.status_code != 200:
                        raise RuntimeError(f"{path} answered {response.status_code}")
                    app_ms = server_ms(response)
                    if app_ms is not None:  # ensemble-ops reports its own handling time
                        inside.append(app_ms)
                    time.sleep(0.01)
                results[path] = {
                    "p50_ms": _percentile(latencies, 50),
                    "p99_ms": _percentile(latencies, 99),
                    "max_ms": max(latencies),
                }
                if inside:
                    results[path] |= {
                        "server_p50_ms": _percentile(inside, 50),
                        "server_p99_ms": _percentile(inside, 99),
                    }
        return results

    async with httpx.AsyncClient(timeout=60) as loaders:
        tasks = [asyncio.create_task(load(loaders, m)) for m in members for _ in (0, 1)]
        await asyncio.sleep(1.0)
        try:
            return await asyncio.to_thread(sample)
        finally:
            stop.set()
            await asyncio.gather(*tasks)


CACHE_MEMBER = "demo-base"
CACHE_DISTINCT = 50  # prompts of the repeated workload


def cache_scenario(
    url: str, *, hits: int, misses: int, workload: int, distinct: int, seed: int
) -> dict[str, Any]:
    """Server time of a cache hit against a miss, and the hit rate of a repeated workload.

    One client, one request at a time on an otherwise idle server: each figure is the
    cache's, not a queue's. Identical requests sent at the same moment would all miss (the
    cache does not coalesce them), so sequential requests also make the hit rate exact.
    """

    def body(prompt: str) -> dict[str, Any]:
        return {
            "model": CACHE_MEMBER,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }

    def send(client: httpx.Client, prompt: str) -> tuple[str, float, float]:
        """X-Cache, the app's own time and the client's time (ms) of one request."""
        started = time.perf_counter()
        response = client.post(f"{url}/v1/completions", json=body(prompt))
        client_ms = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise RuntimeError(f"cache request answered {response.status_code}")
        app_ms = server_ms(response)
        if app_ms is None:
            raise RuntimeError("no Server-Timing: app;dur=<ms> header in the response")
        return response.headers.get("x-cache", ""), app_ms, client_ms

    with httpx.Client(timeout=60) as client:
        # (a) one warm-up request fills the cache, then the same request again and again.
        hot = "The cache benchmark asks the same question every time"
        warm_state, _, _ = send(client, hot)
        hit_server, hit_client, not_hit = [], [], 0
        for _ in range(hits):
            state, app_ms, client_ms = send(client, hot)
            not_hit += state != "HIT"
            hit_server.append(app_ms)
            hit_client.append(client_ms)
        # Misses: deterministic requests the server has never seen, one prompt each.
        miss_server, not_miss = [], 0
        for i in range(misses):
            state, app_ms, _ = send(client, f"Cold cache request {i} asks something new")
            not_miss += state != "MISS"
            miss_server.append(app_ms)
        # (b) a workload that repeats: ``workload`` requests over ``distinct`` prompts.
        rng = random.Random(seed)
        pool = [f"Repeated question {i} about the ensemble's cache" for i in range(distinct)]
        drawn = [rng.choice(pool) for _ in range(workload)]
        states = [send(client, prompt)[0] for prompt in drawn]
    hit_p50, hit_p99 = _percentile(hit_server, 50), _percentile(hit_server, 99)
    miss_p50 = _percentile(miss_server, 50)
    workload_hits = states.count("HIT")
    return {
        "model": CACHE_MEMBER,
        "max_tokens": MAX_TOKENS,
        "warmup_x_cache": warm_state,
        "hit": {
            "requests": hits,
            "not_hit": not_hit,
            "server_p50_ms": hit_p50,
            "server_p99_ms": hit_p99,
            "server_max_ms": max(hit_server),
            "client_p50_ms": _percentile(hit_client, 50),
            "client_p99_ms": _percentile(hit_client, 99),
        },
        "miss": {
            "requests": misses,
            "not_miss": not_miss,
            "server_p50_ms": miss_p50,
            "server_p99_ms": _percentile(miss_server, 99),
        },
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


def _wait_until_up(process: subprocess.Popen[bytes], url: str, ready: Any) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if ready(httpx.get(f"{url}/v1/models", timeout=1)):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start")


def start_peer(path: Path, threads: int | None) -> tuple[subprocess.Popen[bytes], str] | None:
    """``python -m llama_cpp.server`` on one model, or None when it is not installed."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(path),
        "--n_ctx",
        str(N_CTX),
        "--port",
        str(port),
        "--verbose",
        "false",
    ]
    if threads:
        command += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait_until_up(process, url, lambda r: r.status_code == 200)
    return process, url


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def start_server(
    models: dict[str, Path],
    threads: int | None,
    workdir: Path,
    *,
    metrics: bool = True,
    model_fields: dict[str, int] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """``ensemble-ops serve`` on ``models`` (each with ``model_fields``), once all are ready.

    ``sections`` adds config tables: ``{"cache": {"backend": "redis", "url": ...}}``.

    The server logs to workdir/server.log and workdir/server.stderr; their last lines are
    printed when it fails to come up.
    """
    port = _free_port()
    log = workdir / "server.log"
    # The production defaults (info level, one JSON line per request), to a file.
    lines = ["[logging]", f'file = "{log}"', "[metrics]", f"enabled = {str(metrics).lower()}"]
    for table, values in (sections or {}).items():
        lines += [f"[{table}]", *(f"{key} = {json.dumps(value)}" for key, value in values.items())]
    for name, path in models.items():
        lines += ["[[models]]", f'name = "{name}"', f'path = "{path}"', f"n_ctx = {N_CTX}"]
        if threads:
            lines.append(f"n_threads = {threads}")
        lines += [f"{key} = {value}" for key, value in (model_fields or {}).items()]
    config = workdir / "bench.toml"
    config.write_text("\n".join(lines) + "\n")
    command = [
        sys.executable,
        "-m",
        "ensemble_ops",
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
    ]
    with (workdir / "server.stderr").open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(
            process,
            url,
            lambda r: all(m["meta"]["state"] == "ready" for m in r.json()["data"][1:]),
        )
    except Exception:
        if process.poll() is None:
            process.kill()
        for path in (log, workdir / "server.stderr"):
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-30:]
                print(f"--- last lines of {path.name}:", *tail, sep="\n")
        raise
    return process, url


PROBES = ["/v1/models", "/health/live", "/health/ready", "/health/llm/all"]


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
        process, url = start_server(models, args.threads, workdir)
        try:
            served = {
                (name, c): asyncio.run(http_throughput(url, name, args.requests, c))
                for name in models
                for c in (1, 4)
            }
            probes = asyncio.run(probe_latency_under_load(url, list(models), PROBES, args.samples))
            cache = cache_scenario(
                url,
                hits=args.cache_hits,
                misses=args.cache_misses,
                workload=args.cache_workload,
                distinct=CACHE_DISTINCT,
                seed=args.seed,
            )
        finally:
            _stop(process)
        peer: dict[tuple[str, int], float] = {}
        peer_probe: dict[str, dict[str, float]] = {}
        for name, path in models.items():
            started = None if args.no_peer else start_peer(path, args.threads)
            if started is None:
                break
            peer_process, peer_url = started
            try:
                for c in (1, 4):
                    peer[(name, c)] = asyncio.run(http_throughput(peer_url, name, args.requests, c))
                if name == DEMO_MEMBERS[-1].name:
                    # Its one model saturated by 4 clients, like each of ours by 2 (x3).
                    peer_probe = asyncio.run(
                        probe_latency_under_load(
                            peer_url, [None, None], ["/v1/models"], args.samples
                        )
                    )
            finally:
                _stop(peer_process)

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
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
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
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
