"""API keys and their limits: what a key costs a request, fair shares under saturation, and
how exactly a shared limit holds.

1. **Cost of a keyed request** (in-process, the real instruct member SmolLM2-135M): four apps
   in one process, without keys and with a key that has every limit, each with the limits
   counted in memory and in a real Redis. Rounds alternate between them and send the same
   prompts at temperature 0 (so every app generates the very same tokens); the figure is
   the keyed app's median latency over the unkeyed one's, per backend. Beside it, the
   gate's own work (identify the key, admit, settle) timed alone, as a share of a request.
2. **Fair share** (a real server, saturated): key A keeps 16 requests in flight, key B sends
   one at a time. B's queue wait (the request log's ``queue_wait_ms``, what
   ``llm_queue_wait_seconds`` observes) and latency: with fair admission; without it (the
   checkout given by ``--baseline``, which has no keys: the same load, unkeyed, B's requests
   told apart by their request ids); and B alone.
3. **Limit accuracy**: ``rpm = 60`` on two replicas sharing a real Redis, a client offering
   3 requests a second to them in turn for 80 s: the requests admitted in the first minute
   (the bucket's 10 s burst included) and in a steady minute after it.

    python -m benchmarks.access --baseline ../previous-checkout/src

Writes ``benchmarks/results/access.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

from ensemble_ops.access.keys import new_key
from ensemble_ops.config import Settings
from ensemble_ops.serving.real_models import SMOLLM2_135M, ensure_real_models

from .harness import (
    RESULTS_DIR,
    Server,
    machine,
    median,
    percentile,
    redis_server,
    save,
    utc_now,
)
from .request_path import QUESTIONS

RESULTS = RESULTS_DIR / "access.json"
MEMBER = SMOLLM2_135M.name
KEY, KEY_SHA = new_key()
OTHER, OTHER_SHA = new_key()


# -- 1. the cost of a keyed request ---------------------------------------------------------


def _settings(path: Path, *, keyed: bool, redis_url: str | None, namespace: str) -> Settings:
    cache: dict[str, Any] = {"enabled": True, "namespace": namespace}
    if redis_url is not None:
        cache |= {"backend": "redis", "url": redis_url, "timeout_s": 0.5}
    keys = [
        {
            "name": "bench",
            "key_sha256": KEY_SHA,
            "models": [MEMBER, "ensemble"],
            "rpm": 1_000_000,
            "tpm": 1_000_000_000,
            "max_parallel": 64,
        }
    ]
    return Settings.from_mapping(
        {
            "models": [{"name": MEMBER, "path": str(path), "n_ctx": 2048, "parallel": 1}],
            "cache": cache,
            "auth": {"keys": keys if keyed else []},
        },
        base_dir=path.parent,
        environ={},
    )


@contextlib.asynccontextmanager
async def _app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    from asgi_lifespan import LifespanManager

    from ensemble_ops.http.app import create_app

    app = create_app(settings)
    async with LifespanManager(app) as manager:
        await app.state.ensemble.loading_done.wait()
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://bench", timeout=120
        ) as client:
            yield client


async def _round(client: httpx.AsyncClient, keyed: bool, tag: str) -> list[float]:
    headers = {"Authorization": f"Bearer {KEY}"} if keyed else {}
    latencies = []
    for question in QUESTIONS:
        body = {
            "model": MEMBER,
            "messages": [{"role": "user", "content": f"{question} ({tag})"}],
            "max_tokens": 24,
            "temperature": 0,
        }
        started = time.perf_counter()
        answer = await client.post("/v1/chat/completions", json=body, headers=headers)
        latencies.append(time.perf_counter() - started)
        if answer.status_code != 200:
            raise RuntimeError(f"{answer.status_code}: {answer.text}")
    return latencies


async def _gate_cost(settings: Settings, rounds: int = 2000) -> float:
    """Seconds the gate takes for one request (identify, admit, settle), measured alone."""
    from ensemble_ops.access.gate import Gate
    from ensemble_ops.access.keys import Keyring
    from ensemble_ops.access.limits import Limits
    from ensemble_ops.events import EventBus

    bus = EventBus()
    keyring, limits = Keyring(settings.auth), Limits.for_settings(settings, bus)
    gate = Gate(limits, bus)
    try:
        started = time.perf_counter()
        for _ in range(rounds):
            caller = keyring.identify(KEY)
            assert caller is not None
            admitted = await gate.admit(caller, MEMBER, 40, 24)
            await gate.settle(admitted, 50)
        return (time.perf_counter() - started) / rounds
    finally:
        if limits.redis is not None:
            await limits.redis.aclose()


async def keyed_cost(path: Path, redis_url: str, rounds: int) -> dict[str, Any]:
    arms = {
        (backend, keyed): _settings(
            path,
            keyed=keyed,
            redis_url=redis_url if backend == "redis" else None,
            namespace=f"bench-{backend}-{keyed}-{uuid.uuid4().hex[:6]}",
        )
        for backend in ("memory", "redis")
        for keyed in (False, True)
    }
    latencies: dict[tuple[str, bool], list[float]] = {arm: [] for arm in arms}
    async with contextlib.AsyncExitStack() as stack:
        clients = {arm: await stack.enter_async_context(_app(s)) for arm, s in arms.items()}
        for arm, client in clients.items():  # page in, warm the member
            await _round(client, arm[1], "warm")
        for i in range(rounds):
            for arm, client in clients.items():  # every app gets the same prompts
                latencies[arm] += await _round(client, arm[1], f"round {i}")
    result: dict[str, Any] = {}
    for backend in ("memory", "redis"):
        plain, keyed = median(latencies[(backend, False)]), median(latencies[(backend, True)])
        gate_s = await _gate_cost(arms[(backend, True)])
        result[backend] = {
            "unkeyed_median_s": round(plain, 4),
            "keyed_median_s": round(keyed, 4),
            "ratio": round(keyed / plain, 4),
            "gate_us": round(gate_s * 1e6, 1),
            "gate_share_of_request": round(gate_s / plain, 5),
        }
        print(f"keyed cost, {backend}: {result[backend]}", flush=True)
    return result


# -- 2. fair share --------------------------------------------------------------------------


def _key_block() -> dict[str, Any]:
    return {
        "cache": {"enabled": False},
        "auth": {
            "keys": [
                {"name": "a", "key_sha256": KEY_SHA},
                {"name": "b", "key_sha256": OTHER_SHA},
            ]
        },
    }


async def _client_loop(
    url: str, headers: dict[str, str], stop: asyncio.Event, records: list[dict[str, Any]], tag: str
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as client:
        n = 0
        while not stop.is_set():
            n += 1
            request_id = f"{tag}-{uuid.uuid4().hex[:12]}"
            body = {
                "model": MEMBER,
                "prompt": f"Write a line about the number {n} and {uuid.uuid4().hex[:4]}.",
                "max_tokens": 32,
                "temperature": 0.8,
            }
            started = time.perf_counter()
            answer = await client.post(
                "/v1/completions", json=body, headers={"X-Request-ID": request_id}
            )
            records.append(
                {
                    "id": request_id,
                    "status": answer.status_code,
                    "latency_s": time.perf_counter() - started,
                }
            )


async def _saturate(url: str, seconds: float, *, with_a: bool, keyed: bool) -> list[dict[str, Any]]:
    """A keeps 16 in flight (unless ``with_a`` is false), B one; B's records."""
    stop = asyncio.Event()
    a_records: list[dict[str, Any]] = []
    b_records: list[dict[str, Any]] = []
    a = {"Authorization": f"Bearer {KEY}"} if keyed else {}
    b = {"Authorization": f"Bearer {OTHER}"} if keyed else {}
    clients = 16 if with_a else 0
    tasks = [
        asyncio.create_task(_client_loop(url, a, stop, a_records, "a")) for _ in range(clients)
    ]
    if with_a:
        await asyncio.sleep(3.0)  # A's backlog builds up first
    tasks.append(asyncio.create_task(_client_loop(url, b, stop, b_records, "b")))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return b_records


def _queue_waits(log: Path, ids: set[str]) -> list[float]:
    waits = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            ours = entry.get("event") == "request" and entry.get("request_id") in ids
            if ours and "queue_wait_ms" in entry:
                waits.append(entry["queue_wait_ms"] / 1000)
    return waits


def _figures(records: list[dict[str, Any]], log: Path) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == 200]
    waits = _queue_waits(log, {r["id"] for r in ok})
    return {
        "requests": len(records),
        "answered": len(ok),
        "latency_p50_s": round(median([r["latency_s"] for r in ok]), 3),
        "queue_wait_p50_s": round(median(waits), 3) if waits else None,
        "queue_wait_p95_s": round(percentile(waits, 95), 3) if waits else None,
    }


def fair_share(path: Path, baseline: Path | None, seconds: float) -> dict[str, Any]:
    result: dict[str, Any] = {}
    sides: list[tuple[str, dict[str, Any]]] = [("fair", {"admin": True})]
    if baseline is not None:
        sides.append(("without", {"env": {"PYTHONPATH": str(baseline)}, "admin": False}))
    for side, options in sides:
        keyed = side == "fair"
        with (
            tempfile.TemporaryDirectory() as tmp,
            Server.start(
                Path(tmp),
                {MEMBER: path},
                model_fields={"parallel": 8},  # the built-in member's slots
                sections=_key_block() if keyed else {"cache": {"enabled": False}},
                **options,
            ) as server,
        ):
            records = asyncio.run(_saturate(server.url, seconds, with_a=True, keyed=keyed))
            result[side] = _figures(records, server.log)
            if side == "fair":
                alone = asyncio.run(_saturate(server.url, seconds / 2, with_a=False, keyed=True))
                result["alone"] = _figures(alone, server.log)
        print(f"fair share, {side}: {result[side]}", flush=True)
    print(f"fair share, B alone: {result['alone']}", flush=True)
    return result


# -- 3. limit accuracy -----------------------------------------------------------------------


async def _offer(urls: list[str], seconds: float, rate: float) -> list[tuple[float, int]]:
    """``rate`` requests a second, to the replicas in turn: (seconds since start, status)."""
    outcomes: list[tuple[float, int]] = []
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MEMBER, "prompt": "Hi", "max_tokens": 1, "temperature": 0.8}
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        started = time.perf_counter()

        async def one(url: str, at: float) -> None:
            answer = await client.post(f"{url}/v1/completions", json=body)
            outcomes.append((at, answer.status_code))

        tasks = []
        for i in range(int(seconds * rate)):
            at = i / rate
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(urls[i % len(urls)], at)))
        await asyncio.gather(*tasks)
    return outcomes


def limit_accuracy(path: Path, seconds: float = 80.0) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        (tmp / "redis").mkdir()
        redis = stack.enter_context(redis_server(tmp / "redis"))
        sections: dict[str, dict[str, Any]] = {
            "cache": {"backend": "redis", "url": redis.url, "timeout_s": 0.5},
            "auth": {"keys": [{"name": "metered", "key_sha256": KEY_SHA, "rpm": 60}]},
        }
        servers = []
        for i in range(2):
            workdir = tmp / f"replica{i}"
            workdir.mkdir()
            servers.append(
                stack.enter_context(Server.start(workdir, {MEMBER: path}, sections=sections))
            )
        outcomes = asyncio.run(_offer([s.url for s in servers], seconds, rate=3.0))
    admitted = sorted(at for at, status in outcomes if status == 200)
    statuses = sorted({status for _, status in outcomes})
    first = sum(at < 60 for at in admitted)
    steady = sum(20 <= at < 80 for at in admitted)
    result = {
        "offered": len(outcomes),
        "statuses": statuses,
        "admitted_first_minute": first,
        "admitted_steady_minute": steady,
        "rpm": 60,
    }
    print(f"limit accuracy: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", type=Path, help="src/ of a checkout without fair shares")
    parser.add_argument("--rounds", type=int, default=8, help="keyed-cost rounds")
    parser.add_argument("--seconds", type=float, default=30.0, help="per fair-share side")
    parser.add_argument(
        "--parts",
        default="cost,fair,limits",
        help="which parts to run (comma-separated: cost, fair, limits); the others keep "
        "their figures from the results file",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    path = ensure_real_models()[MEMBER]
    result: dict[str, Any] = {}
    if args.output.is_file() and parts != {"cost", "fair", "limits"}:
        result = json.loads(args.output.read_text())
    result |= {"run_at": utc_now(), "machine": machine()}
    if "cost" in parts:
        with tempfile.TemporaryDirectory() as tmp, _redis_url(Path(tmp)) as redis_url:
            result["keyed_cost"] = asyncio.run(keyed_cost(path, redis_url, args.rounds))
    if "fair" in parts:
        baseline = args.baseline.resolve() if args.baseline else None
        result["fair_share"] = fair_share(path, baseline, args.seconds)
    if "limits" in parts:
        result["limit_accuracy"] = limit_accuracy(path)
    save(args.output, result)


@contextlib.contextmanager
def _redis_url(directory: Path) -> Iterator[str]:
    with redis_server(directory) as redis:
        yield redis.url


if __name__ == "__main__":
    main()
