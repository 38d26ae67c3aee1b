"""One machine, many models: the default ensemble against llama.cpp's own server.

Defaults on both sides (what a user gets): ``ensemble-ops serve`` with no config (the two
real members of the default ensemble), and ``llama-server -np N`` on the same file with its
own defaults but for the context per slot (the member's). Parts, each in the same run:

- ``throughput``: completion tokens per second of each member at concurrency 1, 4 and 8,
  against ``llama-server -np N`` at concurrency N;
- ``together``: both members saturated at once (concurrency 4 each): the sum over members of
  tokens/s together / tokens/s alone (the whole machine), 1.0 = nothing lost to sharing;
- ``priority``: the p95 time to first token of ``fast`` requests on the instruct member
  while the base member is saturated with ``creative`` work, against the same requests
  with the base member idle;
- ``probes``: client-side p50/p99 of ``/health/live`` and ``/health/ready`` from another
  process while both members are saturated;
- ``prefix``: a chat with a 700-word system prompt repeated with new questions (one slot):
  time to first token of the first (cold) and the later (warm) requests, against
  llama-server's (``cache_prompt`` is on by default there).

    python -m benchmarks.one_machine [--parts throughput,together,...]

Writes ``benchmarks/results/one_machine.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ensemble_ops.serving.real_models import (
    GEMMA3_270M,
    SMOLLM2_135M,
    RealModel,
    ensure_real_models,
)

from .harness import (
    RESULTS_DIR,
    Server,
    build_llama_server,
    closed_loop,
    llama_server,
    machine,
    median,
    percentile,
    ratio,
    save,
    utc_now,
)

RESULTS = RESULTS_DIR / "one_machine.json"
MAX_TOKENS = 64
SAMPLER = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05}
TOPICS = [
    "the sea", "mountains", "a library", "the moon", "bread", "rivers", "a city at night",
    "trains", "winter", "bees", "a lighthouse", "chess", "rain", "the desert", "music", "maps",
]  # fmt: skip
MEMBERS = (SMOLLM2_135M, GEMMA3_270M)


def body(model: RealModel, i: int, **extra: Any) -> dict[str, Any]:
    """Request i for ``model``: a chat for the instruct model, text for the base model."""
    topic = TOPICS[i % len(TOPICS)]
    if model.instruct:
        prompt: dict[str, Any] = {
            "messages": [{"role": "user", "content": f"Write a short story about {topic}."}]
        }
    else:
        prompt = {"prompt": f"Here is a short story about {topic}. Once upon a time,"}
    return {"model": model.name, "max_tokens": MAX_TOKENS, **SAMPLER, **prompt, **extra}


def path_of(model: RealModel) -> str:
    return "/v1/chat/completions" if model.instruct else "/v1/completions"


def bodies(model: RealModel, count: int | None = None, **extra: Any) -> Iterator[dict[str, Any]]:
    i = 0
    while count is None or i < count:
        yield body(model, i, **extra)
        i += 1


async def tokens_per_s(url: str, model: RealModel, c: int, requests: int) -> float:
    run = await closed_loop(
        url,
        bodies(model, requests),
        concurrency=c,
        path=path_of(model),
        warmup=body(model, 999, max_tokens=4),
        timeout_s=600,
    )
    if run.failed:
        errors = Counter(record.error for record in run.records if not record.ok)
        raise RuntimeError(f"{run.failed} requests failed on {model.name}: {dict(errors)}")
    return run.tokens_per_s


def throughput(server: Server, binary: Path, paths: dict[str, Path], requests: int) -> Any:
    """Each cell four times, ours and theirs in turn (both servers up, the idle one costs
    nothing), so that the machine's drift falls on both alike: the medians, and the median
    of the four ratios."""
    result: dict[str, Any] = {}
    for model in MEMBERS:
        cells: dict[str, Any] = {}
        for c in (1, 4, 8):
            ours, theirs = [], []
            with tempfile.TemporaryDirectory() as workdir, llama_server(
                binary, paths[model.name], slots=c, n_ctx=model.n_ctx, workdir=Path(workdir)
            ) as peer:  # fmt: skip
                for _ in range(4):
                    ours.append(asyncio.run(tokens_per_s(server.url, model, c, requests)))
                    theirs.append(asyncio.run(tokens_per_s(peer.url, model, c, requests)))
            mine, peer_rate = median(ours), median(theirs)
            cells[str(c)] = {
                "ensemble_ops": round(mine, 1),
                "llama_server": round(peer_rate, 1),
                "ratio": round(median([a / b for a, b in zip(ours, theirs, strict=True)]), 3),
            }
            print(f"{model.name} c={c}: {mine:.1f} against {peer_rate:.1f} tok/s", flush=True)
        result[model.name] = cells
    return result


async def _together(url: str, requests: int) -> dict[str, float]:
    runs = await asyncio.gather(*(tokens_per_s(url, model, 4, requests) for model in MEMBERS))
    return {model.name: rate for model, rate in zip(MEMBERS, runs, strict=True)}


def together(server: Server, requests: int) -> Any:
    alone = {m.name: asyncio.run(tokens_per_s(server.url, m, 4, requests)) for m in MEMBERS}
    both = asyncio.run(_together(server.url, requests))
    shares = {name: both[name] / alone[name] for name in alone}
    print(f"together: {both} alone: {alone} sum of shares {sum(shares.values()):.3f}")
    return {
        "alone_tokens_per_s": alone,
        "together_tokens_per_s": both,
        "sum_of_shares": round(sum(shares.values()), 3),
    }


async def _fast_ttfts(url: str, count: int, spacing_s: float) -> list[float]:
    """``count`` streamed fast chats to the instruct member, one every ``spacing_s``."""
    ttfts: list[float] = []
    fresh = httpx.Limits(max_keepalive_connections=0)  # llama-server closes them after streams
    async with httpx.AsyncClient(timeout=120, limits=fresh) as client:
        for i in range(count):
            started = time.perf_counter()
            request = body(SMOLLM2_135M, i, mode="fast", max_tokens=16, stream=True)
            first = None
            async with client.stream("POST", f"{url}/v1/chat/completions", json=request) as r:
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {") and '"content"' in line:
                        first = time.perf_counter() - started
            if first is not None:
                ttfts.append(first)
            await asyncio.sleep(spacing_s)
    return ttfts


async def _busy_base(url: str, stop: asyncio.Event) -> None:
    """Keep the base member saturated with creative completions until ``stop``."""

    async def client(http: httpx.AsyncClient, i: int) -> None:
        while not stop.is_set():
            request = body(GEMMA3_270M, i, mode="creative", max_tokens=128)
            await http.post(f"{url}/v1/completions", json=request)

    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http, i) for i in range(4)))


async def _priority(url: str, count: int) -> dict[str, float]:
    alone = await _fast_ttfts(url, count, 0.2)
    stop = asyncio.Event()
    busy = asyncio.create_task(_busy_base(url, stop))
    await asyncio.sleep(3)  # let the base member fill its slots
    loaded = await _fast_ttfts(url, count, 0.2)
    stop.set()
    await busy
    return {
        "alone_p95_s": round(percentile(alone, 95), 4),
        "base_saturated_p95_s": round(percentile(loaded, 95), 4),
        "alone_p50_s": round(median(alone), 4),
        "base_saturated_p50_s": round(median(loaded), 4),
    }


def priority(server: Server, count: int) -> Any:
    result: dict[str, Any] = dict(asyncio.run(_priority(server.url, count)))
    result["ratio_p95"] = ratio(result["base_saturated_p95_s"], result["alone_p95_s"])
    print(f"priority: {result}")
    return result


_PROBE_SCRIPT = """
import http.client, json, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
paths = ["/health/live", "/health/ready"]
samples = {p: [] for p in paths}
conn = http.client.HTTPConnection(host, port, timeout=30)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for p in paths:
        t = time.perf_counter()
        conn.request("GET", p)
        conn.getresponse().read()
        samples[p].append((time.perf_counter() - t) * 1000)
    time.sleep(0.02)
print(json.dumps(samples))
"""


def sample_probes(url: str, seconds: float) -> dict[str, list[float]]:
    """Probe latencies in milliseconds from a process of their own."""
    host, port = url.removeprefix("http://").split(":")
    done = subprocess.run(
        [sys.executable, "-c", _PROBE_SCRIPT, host, port, str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    samples: dict[str, list[float]] = json.loads(done.stdout)
    return samples


async def _saturated_probes(url: str, seconds: float) -> dict[str, list[float]]:
    stop = asyncio.Event()

    async def client(http: httpx.AsyncClient, model: RealModel, i: int) -> None:
        while not stop.is_set():
            await http.post(f"{url}{path_of(model)}", json=body(model, i))

    async with httpx.AsyncClient(timeout=600) as http:
        load = [asyncio.create_task(client(http, m, i)) for m in MEMBERS for i in range(4)]
        await asyncio.sleep(3)
        samples = await asyncio.to_thread(sample_probes, url, seconds)
        stop.set()
        await asyncio.gather(*load)
    return samples


def probes(server: Server, seconds: float) -> Any:
    samples = asyncio.run(_saturated_probes(server.url, seconds))
    result = {
        path: {
            "n": len(values),
            "p50_ms": round(percentile(values, 50), 2),
            "p99_ms": round(percentile(values, 99), 2),
            "max_ms": round(max(values), 2),
        }
        for path, values in samples.items()
    }
    print(f"probes under saturation: {result}")
    return result


SYSTEM_PROMPT = " ".join(
    ["You are a careful assistant for a public library. You answer questions about opening "
     "hours, borrowing rules, late fees, events, study rooms and the catalogue. You are "
     "polite and brief, you never invent facts, and you say so when you do not know."] * 14
)  # fmt: skip
"""About 700 words, repeated in every request of the prefix part."""
QUESTIONS = [
    "When does the library open on Saturdays?",
    "How many books can I borrow at once?",
    "Is there a fee for a lost card?",
    "Can I reserve a study room?",
    "Do you have audiobooks?",
    "Are dogs allowed inside?",
]


async def _ttft(client: httpx.AsyncClient, url: str, question: str) -> float:
    """Time to first token of the chat with the long system prompt and ``question``."""
    request = {
        "model": SMOLLM2_135M.name,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ],
        "max_tokens": 8,
        "temperature": 0.7,
        "stream": True,
    }
    started = time.perf_counter()
    first = float("nan")
    async with client.stream("POST", f"{url}/v1/chat/completions", json=request) as r:
        async for line in r.aiter_lines():
            if first != first and line.startswith("data: {") and '"content"' in line:
                first = time.perf_counter() - started
    return first


async def _prefix_ttfts(urls: dict[str, str], passes: int) -> dict[str, list[float]]:
    """Each system's first request (cold), then every question ``passes`` times, the
    systems taking turns question by question so that drift falls on both alike."""
    ttfts: dict[str, list[float]] = {name: [] for name in urls}
    # A new connection each: llama-server closes a kept-alive one after a stream.
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=fresh) as client:
        for name, url in urls.items():
            ttfts[name].append(await _ttft(client, url, "Hello!"))
        for _ in range(passes):
            for question in QUESTIONS:
                for name, url in urls.items():
                    ttfts[name].append(await _ttft(client, url, question))
    return ttfts


def prefix(binary: Path, paths: dict[str, Path], passes: int) -> Any:
    with (
        tempfile.TemporaryDirectory() as workdir,
        Server.start(
            Path(workdir),
            {SMOLLM2_135M.name: paths[SMOLLM2_135M.name]},
            n_ctx=SMOLLM2_135M.n_ctx,
            model_fields={"parallel": 1},
            sections={"cache": {"enabled": False}},
        ) as server,
        llama_server(
            binary,
            paths[SMOLLM2_135M.name],
            slots=1,
            n_ctx=SMOLLM2_135M.n_ctx,
            workdir=Path(workdir),
        ) as peer,
    ):
        urls = {"ensemble_ops": server.url, "llama_server": peer.url}
        result = asyncio.run(_prefix_ttfts(urls, passes))
    figures: dict[str, Any] = {}
    for system, ttfts in result.items():
        figures[system] = {
            "cold_s": round(ttfts[0], 4),
            "warm_median_s": round(median(ttfts[1:]), 4),
            "warm_p95_s": round(percentile(ttfts[1:], 95), 4),
            "warm_over_cold": round(median(ttfts[1:]) / ttfts[0], 4),
            "warm_requests": len(ttfts) - 1,
        }
    figures["warm_ratio_to_llama_server"] = ratio(
        figures["ensemble_ops"]["warm_median_s"], figures["llama_server"]["warm_median_s"]
    )
    print(f"prefix: {figures}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--parts", default="prefix,throughput,together,priority,probes", help="comma-separated"
    )
    parser.add_argument("--requests", type=int, default=16, help="per throughput run")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = args.parts.split(",")
    paths = ensure_real_models()
    binary = build_llama_server()
    result: dict[str, Any] = {"run_at": utc_now(), "machine": machine()}
    if "prefix" in parts:
        result["prefix"] = prefix(binary, paths, passes=4)
    with tempfile.TemporaryDirectory() as workdir, Server.start(Path(workdir)) as server:
        if "throughput" in parts:
            result["throughput"] = throughput(server, binary, paths, args.requests)
        if "together" in parts:
            result["together"] = together(server, args.requests)
        if "priority" in parts:
            result["priority"] = priority(server, count=40)
        if "probes" in parts:
            result["probes"] = probes(server, seconds=20)
    save(args.output, result)


if __name__ == "__main__":
    main()
