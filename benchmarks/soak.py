"""Soak test: minutes of mixed traffic, injected faults and reloads against one server.

Starts ``ensemble-ops serve`` on the three demo models and, for ``--minutes``, keeps six
clients sending a mix of completions and chat in every mode (some streamed, some
deterministic so the cache answers) with injected faults: prompts over the context (400),
an unknown model (404), a client that drops its stream after two chunks, malformed JSON
(400). Every 30 s one member is reloaded (``POST /admin/models/{model}/reload``, cycling
through them), and every other time a reload with a bad path follows (400). The server's RSS
is sampled every 5 s.

Expectations, checked at the end: every request answered (no transport error or timeout),
no 5xx (nor an error inside a 200 stream), every fault answered with its code and every
other request with 200, every reload completed, RSS at the end within 5% of RSS after the
first minute, the server healthy at the end and stopping cleanly on SIGTERM. Prints a
summary, writes ``benchmarks/results/soak.json`` and exits 1 when an expectation fails.
Run with ``nox -s soak`` (minutes, not CI).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeAlias

import httpx

from benchmarks.harness import (
    RESULTS_DIR,
    Server,
    machine,
    reload_member,
    save,
    spread,
    utc_now,
)
from ensemble_ops.serving.demo import ensure_demo_models

RESULTS = RESULTS_DIR / "soak.json"
MODES = ("fast", "balanced", "creative")
RSS_GROWTH_LIMIT = 1.05
FIRST_MINUTE_S = 60.0
REQUEST_TIMEOUT_S = 60.0
RELOAD_TIMEOUT_S = 180.0
# Over the demo models' n_ctx (2048) whatever the tokenizer does with it.
OVERSIZED = "word " * 3000
CACHED_PROMPTS = [f"Soak question {i}: what does the cache keep?" for i in range(20)]
# Reload paths the server must refuse before anything starts: outside the model directory,
# and a file that is not there.
BAD_PATHS = ("/etc/hostname", "no-such-model.gguf")


@dataclass(frozen=True)
class Record:
    """One request: what was sent, what came back (status None: no answer at all)."""

    kind: str
    fault: bool
    expected: int
    status: int | None
    latency_s: float
    problem: str | None = None  # a transport error, or a wrong answer under a right status
    cache: str | None = None


Sender: TypeAlias = Callable[[httpx.AsyncClient, random.Random], Awaitable[Record]]


class Soak:
    """The traffic, the reloads and the RSS samples of one soak run."""

    def __init__(self, server: Server, args: argparse.Namespace) -> None:
        self.url = server.url
        self.admin_url = server.admin_url
        self.members = server.members
        self.server = server
        self.duration_s = args.minutes * 60
        self.clients = args.clients
        self.reload_every_s = args.reload_every_s
        self.sample_every_s = args.sample_every_s
        self.seed = args.seed
        self.records: list[Record] = []
        self.reloads: list[dict[str, Any]] = []
        self.bad_reloads: list[dict[str, Any]] = []
        self.rss: list[tuple[float, float, bool]] = []  # (seconds, MiB, during a reload)
        self.reloading = False
        self.started = 0.0
        self.senders: list[tuple[Sender, int]] = [
            (self.completion, 20),
            (self.chat, 20),
            (self.member_completion, 10),
            (self.stream, 12),
            (self.cached, 15),
            (self.probe, 5),
            (self.over_context, 4),
            (self.unknown_model, 4),
            (self.dropped_stream, 4),
            (self.malformed_json, 4),
        ]

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # -- requests ----------------------------------------------------------------------------

    async def _post(
        self,
        client: httpx.AsyncClient,
        kind: str,
        path: str,
        body: dict[str, Any] | bytes,
        *,
        expected: int = 200,
        fault: bool = False,
        code: str | None = None,
    ) -> Record:
        started = time.perf_counter()
        try:
            if isinstance(body, bytes):
                headers = {"content-type": "application/json"}
                response = await client.post(f"{self.url}{path}", content=body, headers=headers)
            else:
                response = await client.post(f"{self.url}{path}", json=body)
        except httpx.HTTPError as err:
            return Record(kind, fault, expected, None, time.perf_counter() - started, repr(err))
        latency = time.perf_counter() - started
        problem = None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code == 200 and not (isinstance(answer, dict) and answer.get("choices")):
            problem = "200 without choices"
        elif code is not None and response.status_code == expected:
            got = answer.get("error", {}).get("code") if isinstance(answer, dict) else None
            problem = None if got == code else f"error code {got!r}, expected {code!r}"
        return Record(
            kind,
            fault,
            expected,
            response.status_code,
            latency,
            problem,
            response.headers.get("x-cache"),
        )

    async def _stream(
        self, client: httpx.AsyncClient, kind: str, path: str, body: dict[str, Any], drop: int
    ) -> Record:
        """Read a stream to ``[DONE]``, or leave after ``drop`` chunks (closing the connection)."""
        started = time.perf_counter()
        problem = None
        try:
            async with client.stream("POST", f"{self.url}{path}", json=body) as response:
                status, chunks, done = response.status_code, 0, False
                if status == 200:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line.removeprefix("data: ")
                        if data == "[DONE]":
                            done = True
                            break
                        if "error" in json.loads(data):
                            problem = f"error in the stream: {data}"
                        chunks += 1
                        if drop and chunks >= drop:
                            break
                    if problem is None and not done and not (drop and chunks >= drop):
                        problem = f"stream ended after {chunks} chunks without [DONE]"
        except httpx.HTTPError as err:
            return Record(kind, bool(drop), 200, None, time.perf_counter() - started, repr(err))
        return Record(kind, bool(drop), 200, status, time.perf_counter() - started, problem)

    async def completion(self, client: httpx.AsyncClient, rng: random.Random) -> Record:
        mode = rng.choice(MODES)
        body = {"model": "ensemble", "mode": mode, "prompt": f"Tell me about {mode} things"}
        return await self._post(client, f"completion {mode}", "/v1/completions", body)

    async def chat(self, client: httpx.AsyncClient, rng: random.Random) -> Record:
        mode = rng.choice(MODES)
        messages = [{"role": "user", "content": f"Chat in {mode} mode, please"}]
        body = {"model": "ensemble", "mode": mode, "messages": messages}
        return await self._post(client, f"chat {mode}", "/v1/chat/completions", body)

    async def member_completion(self, client: httpx.AsyncClient, rng: random.Random) -> Record:
        member = rng.choice(self.members)
        body = {"model": member, "prompt": "A member by name", "max_tokens": 32}
        return await self._post(client, "completion member", "/v1/completions", body)

    async def stream(self, client: httpx.AsyncClient, rng: random.Random) -> Record:
        mode = rng.choice(MODES)
        if rng.random() < 0.5:
            body: dict[str, Any] = {"mode": mode, "prompt": "Stream it", "stream": True}
            return await self._stream(client, f"stream {mode}", "/v1/completions", body, 0)
        messages = [{"role": "user", "content": "Stream a chat"}]
        body = {"mode": mode, "messages": messages, "stream": True}
        return await self._stream(client, f"stream chat {mode}", "/v1/chat/completions", body, 0)

    async def cached(self, client: httpx.AsyncClient, rng: random.Random) -> Record:
        body = {
            "model": rng.choice(self.members),
            "prompt": rng.choice(CACHED_PROMPTS),
            "max_tokens": 16,
            "temperature": 0,
        }
        return await self._post(client, "deterministic", "/v1/completions", body)

    async def probe(self, client: httpx.AsyncClient, rng: random.Random) -> Record:
        path = rng.choice(["/health/ready", "/health/live", "/v1/models", "/metrics"])
        started = time.perf_counter()
        try:
            response = await client.get(f"{self.url}{path}")
        except httpx.HTTPError as err:
            return Record("probe", False, 200, None, time.perf_counter() - started, repr(err))
        return Record("probe", False, 200, response.status_code, time.perf_counter() - started)

    async def over_context(self, client: httpx.AsyncClient, rng: random.Random) -> Record:
        member = rng.choice(self.members)
        if rng.random() < 0.5:
            body: dict[str, Any] = {"model": member, "prompt": OVERSIZED, "max_tokens": 16}
            path = "/v1/completions"
        else:
            body = {"model": member, "messages": [{"role": "user", "content": OVERSIZED}]}
            path = "/v1/chat/completions"
        return await self._post(
            client,
            "fault over context",
            path,
            body,
            expected=400,
            fault=True,
            code="context_length_exceeded",
        )

    async def unknown_model(self, client: httpx.AsyncClient, rng: random.Random) -> Record:
        body = {"model": "no-such-model", "prompt": "Anyone there?"}
        return await self._post(
            client, "fault unknown model", "/v1/completions", body, expected=404, fault=True
        )

    async def dropped_stream(self, client: httpx.AsyncClient, rng: random.Random) -> Record:
        body = {"model": rng.choice(self.members), "prompt": "Leave early", "stream": True}
        return await self._stream(client, "fault dropped stream", "/v1/completions", body, 2)

    async def malformed_json(self, client: httpx.AsyncClient, rng: random.Random) -> Record:
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        body = b'{"model": "demo-tiny", "prompt": "unterminated'
        return await self._post(
            client, "fault malformed json", path, body, expected=400, fault=True
        )

    # -- the run -----------------------------------------------------------------------------

    async def client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        senders = [s for s, _ in self.senders]
        weights = [w for _, w in self.senders]
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            while self.elapsed() < self.duration_s:
                send = rng.choices(senders, weights)[0]
                self.records.append(await send(client, rng))

    async def reload(self, client: httpx.AsyncClient, member: str) -> dict[str, Any]:
        at_s = round(self.elapsed(), 1)
        done = await reload_member(client, self.admin_url, member, timeout_s=RELOAD_TIMEOUT_S)
        record: dict[str, Any] = {"member": member, "at_s": at_s}
        if done.status is not None:
            record["status"] = done.status
        record["outcome"] = done.outcome
        if done.outcome in ("completed", "failed"):
            record["seconds"] = round(done.seconds, 2)
        return record | {"error": done.error}

    async def bad_reload(self, client: httpx.AsyncClient, member: str, path: str) -> None:
        record: dict[str, Any] = {"member": member, "path": path, "expected": 400}
        try:
            answer = await client.post(
                f"{self.admin_url}/admin/models/{member}/reload", json={"path": path}
            )
            record["status"] = answer.status_code
        except httpx.HTTPError as err:
            record |= {"status": None, "error": repr(err)}
        self.bad_reloads.append(record)

    async def reloader(self) -> None:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            n = 0
            while (n + 1) * self.reload_every_s < self.duration_s:
                await asyncio.sleep(max(0.0, (n + 1) * self.reload_every_s - self.elapsed()))
                member = self.members[n % len(self.members)]
                self.reloading = True
                try:
                    self.reloads.append(await self.reload(client, member))
                finally:
                    self.reloading = False
                if n % 2 == 0:
                    await self.bad_reload(client, member, BAD_PATHS[(n // 2) % len(BAD_PATHS)])
                n += 1

    def sample_rss(self) -> None:
        mib = self.server.rss_bytes() / 2**20
        self.rss.append((round(self.elapsed(), 1), round(mib, 2), self.reloading))

    async def sampler(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            self.sample_rss()
            n += 1
            delay = max(0.0, n * self.sample_every_s - self.elapsed())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def run(self) -> dict[str, Any]:
        self.started = time.monotonic()
        stop = asyncio.Event()
        sampler = asyncio.create_task(self.sampler(stop))
        await asyncio.gather(self.reloader(), *(self.client(i) for i in range(self.clients)))
        stop.set()
        await sampler
        traffic_s = self.elapsed()
        await asyncio.sleep(1.0)  # let the last requests' and reloads' memory go back
        self.sample_rss()
        async with httpx.AsyncClient(timeout=10) as client:
            health = {
                path: (await client.get(f"{self.url}{path}")).status_code
                for path in ("/health/live", "/health/ready")
            }
        return {"traffic_s": traffic_s, "health_at_end": health}


def _latency(records: list[Record]) -> dict[str, float]:
    return spread([r.latency_s * 1000 for r in records], peak=True)


def summarize(soak: Soak, run: dict[str, Any], exit_code: int | None) -> dict[str, Any]:
    records = soak.records
    kinds: dict[str, Any] = {}
    for kind in sorted({r.kind for r in records}):
        mine = [r for r in records if r.kind == kind]
        statuses = Counter(str(r.status) for r in mine)
        kinds[kind] = {"count": len(mine), "statuses": dict(statuses)} | _latency(mine)
    unanswered = [r for r in records if r.status is None]
    server_errors = [r for r in records if r.status is not None and r.status >= 500]
    stream_errors = [r for r in records if r.problem and r.problem.startswith("error in")]
    wrong = [r for r in records if r.status is not None and r.status != r.expected]
    bad_body = [r for r in records if r.status == r.expected and r.problem]
    cache = Counter(r.cache for r in records if r.kind == "deterministic" and r.status == 200)

    # RSS after the first minute: the first sample from then on outside a reload (the last
    # one outside a reload when the run is shorter); at the end: after the traffic stopped.
    steady = [(t, mib) for t, mib, reloading in soak.rss[:-1] if not reloading]
    later = [s for s in steady if s[0] >= FIRST_MINUTE_S]
    baseline_at, baseline = (later or steady[-1:] or [(0.0, float("nan"))])[0]
    end_mib = soak.rss[-1][1]
    ratio = end_mib / baseline

    expected_reloads = max(0, int((soak.duration_s - 1e-9) // soak.reload_every_s))
    checks = {
        "every request answered": (not unanswered, f"{len(unanswered)} without an answer"),
        "no 5xx": (
            not server_errors and not stream_errors,
            f"{len(server_errors)} 5xx, {len(stream_errors)} errors inside 200 streams",
        ),
        "faults answered with their codes": (
            not [r for r in wrong + bad_body if r.fault],
            f"{sum(r.fault for r in records)} faults, "
            f"{len([r for r in wrong + bad_body if r.fault])} wrong",
        ),
        "other requests answered 200": (
            not [r for r in wrong + bad_body if not r.fault],
            f"{sum(not r.fault for r in records)} requests, "
            f"{len([r for r in wrong + bad_body if not r.fault])} wrong",
        ),
        "all reloads completed": (
            len(soak.reloads) == expected_reloads
            and all(r.get("outcome") == "completed" for r in soak.reloads),
            f"{sum(r.get('outcome') == 'completed' for r in soak.reloads)} of "
            f"{expected_reloads} completed",
        ),
        "bad-path reloads refused with 400": (
            all(r["status"] == 400 for r in soak.bad_reloads),
            f"{sum(r['status'] == 400 for r in soak.bad_reloads)} of {len(soak.bad_reloads)}",
        ),
        "RSS flat": (
            ratio <= RSS_GROWTH_LIMIT,
            f"end {end_mib:.0f} MiB / {baseline:.0f} MiB at {baseline_at:.0f} s = {ratio:.3f}"
            f" (limit {RSS_GROWTH_LIMIT})",
        ),
        "healthy at the end": (
            all(code == 200 for code in run["health_at_end"].values()),
            json.dumps(run["health_at_end"]),
        ),
        "clean shutdown": (exit_code == 0, f"exit status {exit_code}"),
    }
    problems = [asdict(r) for r in unanswered + server_errors + stream_errors + wrong + bad_body]
    return {
        "settings": {
            "minutes": soak.duration_s / 60,
            "clients": soak.clients,
            "reload_every_s": soak.reload_every_s,
            "sample_every_s": soak.sample_every_s,
            "seed": soak.seed,
        },
        "traffic_s": run["traffic_s"],
        "requests": len(records),
        "requests_per_s": len(records) / run["traffic_s"],
        "faults": sum(r.fault for r in records),
        "by_kind": kinds,
        "problems": problems[:50],
        "deterministic_x_cache": dict(cache),
        "reloads": soak.reloads,
        "bad_path_reloads": soak.bad_reloads,
        "rss": {
            "samples": soak.rss,
            "after_first_minute_mb": baseline,
            "after_first_minute_at_s": baseline_at,
            "end_mb": end_mib,
            "end_vs_first_minute": ratio,
            "max_mb": max(mib for _, mib, _ in soak.rss),
        },
        "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()},
        "passed": all(ok for ok, _ in checks.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--reload-every-s", type=float, default=30.0)
    parser.add_argument("--sample-every-s", type=float, default=5.0, help="RSS sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = ensure_demo_models(workdir / "models")
        with Server.start(workdir, models) as server:
            soak = Soak(server, args)
            print(
                f"soaking {server.url} for {args.minutes:g} min: {args.clients} clients, a "
                f"reload every {args.reload_every_s:g} s, RSS every {args.sample_every_s:g} s",
                flush=True,
            )
            run = asyncio.run(soak.run())
        result = summarize(soak, run, server.returncode)
        # Shown, not judged: the checks above are.
        errors = [json.loads(line).get("event") for line in server.error_lines()]
        result["server_log_errors"] = [str(e) for e in errors][:50]

    print(
        f"\n{result['requests']} requests in {result['traffic_s']:.0f} s "
        f"({result['requests_per_s']:.1f}/s), {result['faults']} of them injected faults:"
    )
    print(f"  {'kind':<26}{'count':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}  statuses")
    for kind, k in result["by_kind"].items():
        print(
            f"  {kind:<26}{k['count']:>7}{k['p50_ms']:>9.1f}{k['p99_ms']:>9.1f}"
            f"{k['max_ms']:>9.1f}  {k['statuses']}"
        )
    print(f"  deterministic requests, X-Cache: {result['deterministic_x_cache']}")
    for r in result["reloads"]:
        print(f"  reload {r['member']} at {r['at_s']} s: {r.get('outcome')} {r.get('seconds', '')}")
    rss = result["rss"]
    print(
        f"  RSS: {rss['after_first_minute_mb']:.0f} MiB at {rss['after_first_minute_at_s']:.0f}"
        f" s, {rss['end_mb']:.0f} MiB at the end, max {rss['max_mb']:.0f} MiB"
    )
    if result["server_log_errors"]:
        print(f"  server log errors: {Counter(result['server_log_errors'])}")
    for problem in result["problems"][:10]:
        print(f"  problem: {problem}")
    print()
    for name, check in result["checks"].items():
        print(f"  {'PASS' if check['ok'] else 'FAIL'}  {name}: {check['detail']}")
    result |= {"machine": machine(), "when": utc_now()}
    save(args.output, result)
    if not result["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
