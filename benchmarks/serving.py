"""Serving benchmark: ensemble-ops over HTTP against direct llama_cpp calls, same run.

Measures, on whatever machine runs it:

1. throughput of ``/v1/completions`` on each demo member (16-token completions, concurrency
   1 and 4) as a ratio to calling the same llama_cpp model directly, in-process, with the
   same prompts and settings;
2. latency of ``GET /v1/models`` while all three members are saturated with requests.

Prints a table and writes ``benchmarks/results/latest.json``. Run with ``nox -s bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from ensemble_ops.demo import DEMO_MEMBERS, ensure_demo_models

RESULTS = Path(__file__).parent / "results" / "latest.json"
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
            llm.create_completion(PROMPTS[i % len(PROMPTS)], max_tokens=MAX_TOKENS,
                                  temperature=0.8)
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
            body = {"model": member, "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": MAX_TOKENS, "temperature": 0.8}
            response = await client.post(f"{url}/v1/completions", json=body)
            failures += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await client.post(f"{url}/v1/completions",
                          json={"model": member, "prompt": "warm", "max_tokens": MAX_TOKENS})
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{failures} requests failed during the throughput run")
    return requests / elapsed


async def probe_latency_under_load(url: str, samples: int) -> dict[str, float]:
    """p50/p99/max of GET /v1/models while every member is saturated."""
    stop = asyncio.Event()

    async def load(client: httpx.AsyncClient, member: str) -> None:
        while not stop.is_set():
            await client.post(f"{url}/v1/completions",
                              json={"model": member, "prompt": "busy", "max_tokens": 64,
                                    "temperature": 0.8})

    async with httpx.AsyncClient(timeout=60) as loaders, httpx.AsyncClient(timeout=60) as probe:
        tasks = [asyncio.create_task(load(loaders, m.name)) for m in DEMO_MEMBERS for _ in (0, 1)]
        await asyncio.sleep(1.0)
        latencies = []
        for _ in range(samples):
            started = time.perf_counter()
            response = await probe.get(f"{url}/v1/models")
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*tasks)
    return {
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "max_ms": max(latencies),
    }


def start_server(models: dict[str, Path], threads: int | None, workdir: Path) -> tuple[
    subprocess.Popen[bytes], str
]:
    port = _free_port()
    lines = ["[logging]", 'level = "warning"', "[server]", "access_log = false"]
    for name, path in models.items():
        lines += ["[[models]]", f'name = "{name}"', f'path = "{path}"', f"n_ctx = {N_CTX}"]
        if threads:
            lines.append(f"n_threads = {threads}")
    config = workdir / "bench.toml"
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "ensemble_ops", "serve", "--config", str(config),
         "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            data = httpx.get(f"{url}/v1/models", timeout=1).json()["data"][1:]
            if all(m["meta"]["state"] == "ready" for m in data):
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200, help="per throughput cell")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    parser.add_argument("--samples", type=int, default=300, help="probe samples")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = ensure_demo_models(workdir / "models")
        direct = {name: direct_throughput(path, args.requests, args.threads)
                  for name, path in models.items()}
        process, url = start_server(models, args.threads, workdir)
        try:
            served = {
                (name, c): asyncio.run(http_throughput(url, name, args.requests, c))
                for name in models for c in (1, 4)
            }
            probe = asyncio.run(probe_latency_under_load(url, args.samples))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)

    rows = []
    print(f"\n{'member':<12}{'direct req/s':>14}{'c=1 req/s':>12}{'ratio':>8}"
          f"{'c=4 req/s':>12}{'ratio':>8}")
    for name, rate in direct.items():
        one, four = served[(name, 1)], served[(name, 4)]
        rows.append({"member": name, "direct_rps": rate, "c1_rps": one, "c4_rps": four,
                     "c1_ratio": one / rate, "c4_ratio": four / rate})
        print(f"{name:<12}{rate:>14.1f}{one:>12.1f}{one / rate:>8.2f}{four:>12.1f}"
              f"{four / rate:>8.2f}")
    print(f"\nGET /v1/models with all members saturated: p50 {probe['p50_ms']:.1f} ms, "
          f"p99 {probe['p99_ms']:.1f} ms, max {probe['max_ms']:.1f} ms")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "settings": {"requests": args.requests, "max_tokens": MAX_TOKENS,
                     "threads": args.threads, "n_ctx": N_CTX},
        "throughput": rows,
        "models_probe_under_load": probe,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
