"""SLA benchmark: the product owner's targets, measured on the real-model default ensemble.

Starts ``ensemble-ops serve`` with no config (the default ensemble: smollm2-135m, instruct,
first for ``fast`` and ``balanced``; gemma3-270m, first for ``creative``), or uses ``--url``,
and offers it open-loop Poisson traffic: ``--rate`` requests/s for ``--duration`` s, each
request sent on its schedule whatever the earlier ones are doing. A ``--repeat-share`` of the
requests repeats one of 20 fixed prompts at temperature 0 (cacheable); the rest are unique
prompts at temperature 0.7. Modes take turns; every request is a 64-token
``/v1/chat/completions`` on ``model: "ensemble"``. Meanwhile ``/health/ready`` and
``/health/live`` are polled every 0.5 s, and smollm2-135m is reloaded once (``--reload-at``,
half-way by default).

The targets: p95 latency fast < 2.5 s, balanced < 3 s, creative < 4 s; 10+ requests/s
sustained; cache hits > 80% of completed requests; errors < 1%; >= 99% of offered requests
completed. Latency percentiles (nearest rank) cover completed requests (200s), over the whole
run and over the steady state (requests sent after the first ``STEADY_AFTER_S`` = 45 s);
errors count separately (a 503 that refused a request it could not start in time is an
error, so refusals cannot buy latency). The cold-start drain time is the end of the last 15 s
window (sliding by 5 s) in which more than 10% of the requests sent missed their mode's
target (an error misses it too). ``--stream`` streams every request. Prints the table,
writes ``benchmarks/results/sla.json`` (``--markdown`` also prints it as Markdown, for
``docs/performance.md``) and exits 0 whether or not the targets are met: it is a
measurement. Run with ``nox -s sla`` (two minutes of traffic by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import (
    RESULTS_DIR,
    ProbeSample,
    ProbeSampler,
    Record,
    Server,
    machine,
    percentile,
    reload_member,
    save,
    send,
    utc_now,
    wait_ready,
)
from ensemble_ops.serving.real_models import SMOLLM2_135M

RESULTS = RESULTS_DIR / "sla.json"
DEFAULT_RATE = 10.0
DEFAULT_DURATION_S = 120.0
MODES = ("fast", "balanced", "creative")
P95_TARGET_S = {"fast": 2.5, "balanced": 3.0, "creative": 4.0}
RPS_TARGET = 10.0
CACHE_HIT_TARGET = 0.80
ERROR_TARGET = 0.01
COMPLETED_TARGET = 0.99
MAX_TOKENS = 64
STEADY_AFTER_S = 45.0
DRAIN_WINDOW_S = 15.0
DRAIN_STEP_S = 5.0
DRAIN_MISS_SHARE = 0.10
PROBES = ("/health/ready", "/health/live")
PROBE_EVERY_S = 0.5
RELOAD_MEMBER = SMOLLM2_135M.name
RELOAD_TIMEOUT_S = 300.0
START_TIMEOUT_S = 300.0
REPEATED = [
    "What is the capital of France?", "Name three primary colours.",
    "How many days are in a leap year?", "What does a thermometer measure?",
    "Give me a synonym for happy.", "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?", "What is two plus two?", "Name a planet in our solar system.",
    "What language is spoken in Brazil?", "How many legs does a spider have?",
    "What is the opposite of cold?", "Name a fruit that is yellow.",
    "What do bees make?", "What is the largest ocean on Earth?",
    "How many minutes are in an hour?", "What gas do plants take in?",
    "Name a musical instrument with strings.", "What is frozen water called?",
    "Which animal is known as the king of the jungle?",
]  # fmt: skip
TOPICS = [
    "the sea", "mountains", "a library", "the moon", "bread", "rivers", "a city at night",
    "trains", "winter", "bees", "a lighthouse", "chess", "rain", "the desert", "music", "maps",
]  # fmt: skip


@dataclass(frozen=True)
class Planned:
    """One request of the schedule: when it is due (seconds from the start) and what it asks."""

    at_s: float
    mode: str
    prompt: str
    repeated: bool
    stream: bool = False

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": "ensemble",
            "mode": self.mode,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0 if self.repeated else 0.7,
        }
        if self.stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body


@dataclass(frozen=True)
class Outcome:
    """What became of one planned request: when it was sent (seconds from the start) and its
    record (error None: a 200 with a usable body)."""

    planned: Planned
    sent_s: float
    record: Record

    @property
    def latency_s(self) -> float:
        return self.record.latency_s

    @property
    def error(self) -> str | None:
        return self.record.error

    @property
    def cache(self) -> str | None:
        return self.record.headers.get("x-cache")

    @property
    def member(self) -> str | None:
        return self.record.headers.get("x-ensemble-member")

    @property
    def completion_tokens(self) -> int | None:
        return self.record.completion_tokens

    @property
    def missed(self) -> bool:
        """It failed, or took longer than its mode's target."""
        return self.error is not None or self.latency_s >= P95_TARGET_S[self.planned.mode]


def plan(
    rate: float, duration_s: float, repeat_share: float, seed: int, stream: bool = False
) -> list[Planned]:
    """Poisson arrivals over ``duration_s``; modes in turn; repeats drawn from REPEATED."""
    rng = random.Random(seed)
    planned: list[Planned] = []
    at = rng.expovariate(rate)
    while at < duration_s:
        i = len(planned)
        repeated = rng.random() < repeat_share
        prompt = (
            rng.choice(REPEATED)
            if repeated
            else f"Request {i}: write two sentences about {rng.choice(TOPICS)}."
        )
        planned.append(Planned(at, MODES[i % len(MODES)], prompt, repeated, stream))
        at += rng.expovariate(rate)
    return planned


async def offer(
    client: httpx.AsyncClient, planned: Planned, started: float, timeout_s: float
) -> Outcome:
    """One request, with a deadline on the whole of it."""
    record = await send(client, "/v1/chat/completions", planned.body(), timeout_s=timeout_s)
    return Outcome(planned, record.started - started, record)


async def reload(
    client: httpx.AsyncClient, admin_url: str, at_s: float, started: float
) -> dict[str, Any]:
    """At ``at_s``, reload RELOAD_MEMBER and follow it until it completes or fails."""
    await asyncio.sleep(max(0.0, started + at_s - time.perf_counter()))
    done = await reload_member(client, admin_url, RELOAD_MEMBER, timeout_s=RELOAD_TIMEOUT_S)
    record: dict[str, Any] = {"member": RELOAD_MEMBER, "at_s": round(done.started - started, 2)}
    if done.status is not None:
        record["status"] = done.status
    return record | {
        "outcome": done.outcome,
        "seconds": round(done.seconds, 2),
        "ended_at_s": round(done.ended - started, 2),
        "error": done.error,
    }


async def run(
    url: str,
    admin_url: str,
    schedule: list[Planned],
    timeout_s: float,
    reload_at_s: float | None,
) -> tuple[list[Outcome], dict[str, list[ProbeSample]], dict[str, Any] | None, float]:
    """Offer ``schedule`` open-loop; the outcomes, probe samples, reload record and lag (s)."""
    # No connection limit: a request waiting for a pooled connection would not be open-loop.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    with ProbeSampler(url, PROBES, every_s=PROBE_EVERY_S) as probes:
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
            started = time.perf_counter()
            reloading = (
                None
                if reload_at_s is None
                else asyncio.create_task(reload(client, admin_url, reload_at_s, started))
            )
            tasks, lag = [], 0.0
            for planned in schedule:
                delay = started + planned.at_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                lag = max(lag, time.perf_counter() - started - planned.at_s)
                tasks.append(asyncio.create_task(offer(client, planned, started, timeout_s)))
            outcomes = list(await asyncio.gather(*tasks))
            reloaded = None if reloading is None else await reloading
    return outcomes, probes.samples, reloaded, lag


def _latency(outcomes: list[Outcome]) -> dict[str, Any]:
    values = [o.latency_s for o in outcomes]
    if not values:
        return {"n": 0, "p50_s": None, "p95_s": None, "p99_s": None}
    return {
        "n": len(values),
        "p50_s": round(percentile(values, 50), 3),
        "p95_s": round(percentile(values, 95), 3),
        "p99_s": round(percentile(values, 99), 3),
    }


def cold_start_drain(outcomes: list[Outcome], duration_s: float) -> dict[str, Any]:
    """The end of the last window (``DRAIN_WINDOW_S`` long, sliding by ``DRAIN_STEP_S``)
    in which more than ``DRAIN_MISS_SHARE`` of the requests sent missed their target; 0
    when none did. Every such window is listed."""
    bad: list[dict[str, Any]] = []
    start = 0.0
    while start + DRAIN_WINDOW_S <= duration_s + 1e-9:
        inside = [o for o in outcomes if start <= o.sent_s < start + DRAIN_WINDOW_S]
        if inside:
            share = sum(o.missed for o in inside) / len(inside)
            if share > DRAIN_MISS_SHARE:
                bad.append({"from_s": start, "to_s": start + DRAIN_WINDOW_S, "missed": share})
        start += DRAIN_STEP_S
    return {"drain_s": bad[-1]["to_s"] if bad else 0.0, "windows_missing": bad}


def _probe_figures(samples: list[ProbeSample]) -> dict[str, Any]:
    client = [s.client_ms for s in samples]
    inside = [s.server_ms for s in samples if s.server_ms is not None]
    return {
        "samples": len(samples),
        "not_200": sum(s.status != 200 for s in samples),
        "client_p50_ms": round(percentile(client, 50), 2) if client else None,
        "client_p99_ms": round(percentile(client, 99), 2) if client else None,
        "server_p50_ms": round(percentile(inside, 50), 2) if inside else None,
        "server_p99_ms": round(percentile(inside, 99), 2) if inside else None,
    }


def summarize(
    outcomes: list[Outcome],
    probes: dict[str, list[ProbeSample]],
    reloaded: dict[str, Any] | None,
    duration_s: float,
    rate: float,
) -> dict[str, Any]:
    """Every figure of the report, and the rows of the targets table."""
    offered = len(outcomes)
    done = [o for o in outcomes if o.error is None]
    errors = Counter(o.error for o in outcomes if o.error is not None)
    answered = sorted(o.sent_s + o.latency_s for o in done)
    # Completions per second from the first answer to the last: the throughput the server
    # kept up, neither diluted by the drain after the last request nor by the first latency.
    achieved = (len(answered) - 1) / (answered[-1] - answered[0]) if len(answered) > 1 else 0.0
    repeats = [o.planned for o in outcomes if o.planned.repeated]
    # The cache key holds the mode's sampling settings, so each (prompt, mode) misses once.
    first_sightings = len({(p.prompt, p.mode) for p in repeats})
    possible = (len(repeats) - first_sightings) / offered if offered else 0.0
    hits = sum(o.cache == "HIT" for o in done)
    hit_share = hits / len(done) if done else 0.0
    error_rate = sum(errors.values()) / offered if offered else 0.0
    completed_share = len(done) / offered if offered else 0.0
    tokens = [o.completion_tokens for o in done if o.completion_tokens is not None]
    by_mode: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for mode in MODES:
        mine = [o for o in done if o.planned.mode == mode]
        figures = _latency(mine)
        steady = _latency([o for o in mine if o.sent_s >= STEADY_AFTER_S])
        p95 = steady["p95_s"]
        figures |= {
            "steady": steady,
            "target_p95_s": P95_TARGET_S[mode],
            "met": p95 is not None and p95 < P95_TARGET_S[mode],
            "not_cached": _latency([o for o in mine if o.cache != "HIT"]),
            "members": dict(Counter(o.member for o in mine)),
        }
        by_mode[mode] = figures
        shown = "-" if p95 is None else f"{p95:.2f} s (whole run {figures['p95_s']} s)"
        rows.append(_row(f"{mode} p95, steady", f"< {P95_TARGET_S[mode]} s", shown, figures["met"]))
    # Achieved throughput cannot pass a target the offered rate is below.
    rps_met = None if rate < RPS_TARGET else achieved >= RPS_TARGET
    drain = cold_start_drain(outcomes, duration_s)
    rows += [
        _row(
            "cold-start drain",
            "<= 20 s",
            f"{drain['drain_s']:g} s",
            drain["drain_s"] <= 20.0,
        ),
        _row("requests/s sustained", f">= {RPS_TARGET:.0f}", f"{achieved:.2f}", rps_met),
        _row(
            "cache hits",
            f"> {CACHE_HIT_TARGET:.0%}",
            f"{hit_share:.1%} (at most {possible:.1%})",
            hit_share > CACHE_HIT_TARGET,
        ),
        _row("errors", f"< {ERROR_TARGET:.0%}", f"{error_rate:.2%}", error_rate < ERROR_TARGET),
        _row(
            "completed / offered",
            f">= {COMPLETED_TARGET:.0%}",
            f"{completed_share:.1%} ({len(done)}/{offered})",
            completed_share >= COMPLETED_TARGET,
        ),
    ]
    figures_out: dict[str, Any] = {
        "offered": offered,
        "completed": len(done),
        "completed_share": round(completed_share, 4),
        "errors": dict(errors),
        "error_rate": round(error_rate, 4),
        "offered_rps": round(offered / duration_s, 3),
        "achieved_rps": round(achieved, 3),
        "cache_hits": hits,
        "cache_hit_share": round(hit_share, 4),
        "cache_hit_share_possible": round(possible, 4),
        "mean_completion_tokens": round(sum(tokens) / len(tokens), 2) if tokens else None,
        "latency_by_mode": by_mode,
        "cold_start": drain,
        "probes": {path: _probe_figures(samples) for path, samples in probes.items()},
        "reload": reloaded,
        "targets": rows,
    }
    if reloaded is not None and "ended_at_s" in reloaded:
        during = [o for o in outcomes if reloaded["at_s"] <= o.sent_s <= reloaded["ended_at_s"]]
        figures_out["during_reload"] = {
            "offered": len(during),
            "errors": sum(o.error is not None for o in during),
            "latency": _latency([o for o in during if o.error is None]),
        }
    return figures_out


def _row(figure: str, goal: str, shown: str, met: bool | None) -> dict[str, Any]:
    return {"figure": figure, "goal": goal, "measured": shown, "met": met}


def _met(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[met]


def markdown(result: dict[str, Any]) -> str:
    """The targets table and the latency by mode, as Markdown."""
    figures, settings = result["figures"], result["settings"]
    out = [
        f"{settings['rate_rps']:g} requests/s offered for {settings['duration_s']:g} s "
        f"({figures['offered']} requests, {settings['repeat_share']:.0%} repeated), "
        f"{result['machine']['cpus']} CPUs",
        "",
        "| figure | target | measured | met |",
        "|---|---|---|---|",
    ]
    out += [
        f"| {r['figure']} | {r['goal']} | {r['measured']} | {_met(r['met'])} |"
        for r in figures["targets"]
    ]
    out += [
        "",
        "| mode | n | p50 (s) | p95 (s) | p99 (s) | steady p95 (s) | steady p99 (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, f in figures["latency_by_mode"].items():
        cells = [f"{f[k]:.2f}" if f[k] is not None else "-" for k in ("p50_s", "p95_s", "p99_s")]
        cells += [
            f"{f['steady'][k]:.2f}" if f["steady"][k] is not None else "-"
            for k in ("p95_s", "p99_s")
        ]
        out.append(f"| {mode} | {f['n']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def report(result: dict[str, Any]) -> None:
    """Print the targets, the latency by mode, probes, reload and errors."""
    figures = result["figures"]
    print(f"\n{'figure':<24}{'target':<10}{'measured':<30}met")
    for r in figures["targets"]:
        print(f"{r['figure']:<24}{r['goal']:<10}{r['measured']:<30}{_met(r['met'])}")
    print(
        f"\n{'mode':<10}{'n':>6}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}{'steady p95':>12}"
        f"{'p99':>8}   uncached p95 s, members"
    )
    for mode, f in figures["latency_by_mode"].items():
        values = [f[k] for k in ("p50_s", "p95_s", "p99_s")]
        values += [f["steady"]["p95_s"], f["steady"]["p99_s"]]
        widths = (8, 8, 8, 12, 8)
        cells = "".join(
            f"{v:>{w}.2f}" if v is not None else f"{'-':>{w}}"
            for v, w in zip(values, widths, strict=True)
        )
        uncached = f["not_cached"]["p95_s"]
        shown = "-" if uncached is None else f"{uncached:.2f}"
        print(f"{mode:<10}{f['n']:>6}{cells}   {shown}, {f['members']}")
    drain = figures["cold_start"]
    windows = ", ".join(
        f"{w['from_s']:g}-{w['to_s']:g} s ({w['missed']:.0%})" for w in drain["windows_missing"]
    )
    print(f"cold-start drain: {drain['drain_s']:g} s; windows missing: {windows or 'none'}")
    print(f"\n{'probe (ms)':<16}{'n':>6}{'not 200':>9}{'client p50':>12}{'p99':>8}", end="")
    print(f"{'server p50':>12}{'p99':>8}")
    for path, p in figures["probes"].items():
        cells = "".join(
            f"{p[k]:>{w}.2f}" if p[k] is not None else f"{'-':>{w}}"
            for k, w in (
                ("client_p50_ms", 12),
                ("client_p99_ms", 8),
                ("server_p50_ms", 12),
                ("server_p99_ms", 8),
            )
        )
        print(f"{path:<16}{p['samples']:>6}{p['not_200']:>9}{cells}")
    reloaded = figures["reload"]
    if reloaded is not None:
        print(
            f"\nreload of {reloaded['member']} at {reloaded['at_s']} s: {reloaded['outcome']} "
            f"in {reloaded.get('seconds')} s"
            + (f" ({reloaded['error']})" if reloaded["error"] else "")
        )
    if "during_reload" in figures:
        d = figures["during_reload"]
        p95 = d["latency"]["p95_s"]
        print(f"  sent during it: {d['offered']}, errors {d['errors']}, p95 {p95} s")
    print(
        f"\noffered {figures['offered']} ({figures['offered_rps']} req/s), completed "
        f"{figures['completed']}, errors {figures['errors'] or 'none'}, mean completion tokens "
        f"{figures['mean_completion_tokens']}, cache hits {figures['cache_hits']}"
    )
    harness = result["harness"]
    print(
        f"harness: schedule lag max {harness['max_schedule_lag_ms']} ms, wall {harness['wall_s']} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="measure this running server instead of starting one")
    parser.add_argument(
        "--admin-url",
        default="http://127.0.0.1:8001",
        help="with --url: its admin listener, for the mid-run reload",
    )
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="requests/s offered")
    parser.add_argument(
        "--duration", "--seconds", type=float, default=DEFAULT_DURATION_S, help="seconds"
    )
    parser.add_argument("--stream", action="store_true", help="stream every request")
    parser.add_argument(
        "--repeat-share", type=float, default=0.9, help="of requests repeating a fixed prompt"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0, help="of the arrivals and prompts")
    parser.add_argument(
        "--reload-at", type=float, default=None, help="seconds into the run (default: half-way)"
    )
    parser.add_argument("--no-reload", action="store_true", help=f"do not reload {RELOAD_MEMBER}")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON file")
    args = parser.parse_args()
    if args.rate <= 0 or args.duration <= 0 or not 0 <= args.repeat_share <= 1:
        parser.error("--rate and --duration must be positive, --repeat-share within [0, 1]")
    reload_at = None if args.no_reload else args.reload_at
    if not args.no_reload and reload_at is None:
        reload_at = args.duration / 2

    schedule = plan(args.rate, args.duration, args.repeat_share, args.seed, args.stream)
    load_before = os.getloadavg()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        server = None
        if args.url:
            url, admin_url = args.url.rstrip("/"), args.admin_url.rstrip("/")
            members = wait_ready(url, START_TIMEOUT_S)
        else:
            server = running.enter_context(Server.start(Path(tmp), timeout_s=START_TIMEOUT_S))
            url, admin_url, members = server.url, server.admin_url, server.members
            if RELOAD_MEMBER not in members:
                raise RuntimeError(f"not the real-model ensemble (demo fallback?): {members}")
        print(
            f"ready ({members}) after {time.perf_counter() - began:.1f} s; offering "
            f"{len(schedule)} requests over {args.duration:g} s",
            flush=True,
        )
        outcomes, probes, reloaded, lag = asyncio.run(
            run(url, admin_url, schedule, args.timeout, reload_at)
        )
    result: dict[str, Any] = {
        "machine": machine() | {"load_average_before": [round(x, 2) for x in load_before]},
        "settings": {
            # A smoke run (below the default rate or duration) is marked as one.
            "run": "full"
            if args.rate >= DEFAULT_RATE and args.duration >= DEFAULT_DURATION_S
            else "smoke",
            "rate_rps": args.rate,
            "duration_s": args.duration,
            "repeat_share": args.repeat_share,
            "stream": args.stream,
            "steady_after_s": STEADY_AFTER_S,
            "repeated_prompts": len(REPEATED),
            "max_tokens": MAX_TOKENS,
            "timeout_s": args.timeout,
            "seed": args.seed,
            "reload_at_s": reload_at,
            "server": args.url or "ensemble-ops serve (no config: the real-model ensemble)",
            "members": members,
        },
        "figures": summarize(outcomes, probes, reloaded, args.duration, args.rate),
        "harness": {
            "max_schedule_lag_ms": round(lag * 1000, 1),
            "wall_s": round(time.perf_counter() - began, 1),
            "server_exit_code": None if server is None else server.returncode,
        },
        "when": utc_now(),
    }
    report(result)
    if args.markdown:
        print("\n" + markdown(result))
    save(args.output, result)


if __name__ == "__main__":
    main()
