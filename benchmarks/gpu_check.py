"""CUDA verification: ensemble-ops with every layer on an NVIDIA GPU (H100/H200).

Run it on the GPU machine through ``benchmarks/gpu_check.sh`` (which builds or installs a
CUDA llama-cpp-python offline first), or directly with a CUDA build already installed::

    python -m benchmarks.gpu_check                         # the real check (GPU needed)
    python -m benchmarks.gpu_check --allow-cpu --size small  # smoke test without a GPU

It generates ``gpu-large`` (a random-weight llama model, 2048 wide, 4 layers, f32, about
830 MB) beside the demo members and measures, in one run:

1. tokens/s of 64-token completions on gpu-large: (a) direct in-process llama_cpp with
   ``n_gpu_layers=-1``, (b) direct on the CPU (``n_gpu_layers=0``, fewer requests),
   (c) through ``ensemble-ops serve`` with ``n_gpu_layers = -1`` for every member, at
   concurrency 1 and 4; with the ratios served / direct-GPU and GPU / CPU;
2. ``gpu_memory_mb`` of ``/health/llm?model=gpu-large`` and of ``/health/llm/all`` against
   ``nvidia-smi``: the server process's ``used_memory`` (``--query-compute-apps``) and the
   device's ``memory.used``;
3. the device's ``memory.used`` before and after 10 sequential reloads of gpu-large, each
   waited to ``completed`` (goal: within 5%);
4. one reload of gpu-large while 4 clients keep sending completions for its whole duration
   (goal: no failed request).

Prints each figure, then a Markdown table for the GPU section of ``docs/performance.md``,
and writes ``benchmarks/results/gpu_check.json``. Exit status: 0 when every goal that could
be measured is met, 1 when one is missed or a step failed, 2 when llama_cpp cannot offload
to a GPU (a CPU build) and ``--allow-cpu`` was not given. Without ``nvidia-smi`` (or
``--allow-cpu`` on a machine without a GPU) the nvidia-smi figures read ``n/a``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from benchmarks.harness import (
    N_CTX,
    PROMPTS,
    RESULTS_DIR,
    LoadRun,
    PeakSampler,
    Reloaded,
    Server,
    closed_loop,
    completion_bodies,
    completion_load,
    direct_run,
    in_process,
    machine,
    ratio,
    reload_member,
    save,
    until,
    utc_now,
)
from ensemble_ops.serving.demo import DemoModel, _vocabulary, ensure_demo_models, write_model

RESULTS = RESULTS_DIR / "gpu_check.json"
MEMBER = "gpu-large"
MAX_TOKENS = 64
MIB = 2**20
VRAM_TOLERANCE = 0.05  # memory.used after the reloads within 5% of before
LOAD_CLIENTS = 4

T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """What one ``--size`` runs: the model and how many requests each measurement sends."""

    model: DemoModel
    gpu_requests: int
    cpu_requests: int
    served_requests: int
    file_mb_range: tuple[float, float] | None
    baseline_s: float


PLANS = {
    # 2048 wide like a 1-3B model; 4 layers keep the f32 file at about 830 MB.
    "large": Plan(
        DemoModel("gpu-large", n_embd=2048, n_layer=4, n_ff=5632, n_head=16, seed=7),
        gpu_requests=48,
        cpu_requests=4,
        served_requests=48,
        file_mb_range=(300.0, 900.0),
        baseline_s=2.0,
    ),
    # The CPU smoke test: demo-base's width, about 57 MB; a few requests per figure.
    "small": Plan(
        DemoModel("gpu-large", n_embd=512, n_layer=4, n_ff=1536, n_head=8, seed=7),
        gpu_requests=6,
        cpu_requests=3,
        served_requests=6,
        file_mb_range=None,
        baseline_s=1.0,
    ),
}


def expected_file_bytes(model: DemoModel) -> int:
    """The f32 tensors of ``model`` as ``demo.write_model`` lays them out (header aside)."""
    n_vocab = len(_vocabulary(model.byte_tokens)[0])
    e, f = model.n_embd, model.n_ff
    per_layer = 2 * e + 4 * e * e + 3 * f * e
    return 4 * (2 * n_vocab * e + e + model.n_layer * per_layer)


# -- nvidia-smi ---------------------------------------------------------------------------


def _smi(*query: str) -> list[list[str]] | None:
    """Rows of ``nvidia-smi <query> --format=csv,noheader,nounits``, None without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, *query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return [[f.strip() for f in line.split(",")] for line in done.stdout.splitlines() if line]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def smi_gpus() -> list[dict[str, str]] | None:
    rows = _smi("--query-gpu=name,driver_version,memory.total")
    if rows is None:
        return None
    keys = ("name", "driver_version", "memory_total_mb")
    return [dict(zip(keys, row, strict=False)) for row in rows]


def smi_device_used_mb() -> float | None:
    """``memory.used`` summed over the GPUs (MiB), None without nvidia-smi."""
    values = [_number(row[0]) for row in _smi("--query-gpu=memory.used") or []]
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def smi_process_used_mb(pid: int) -> tuple[float | None, str]:
    """``used_memory`` of ``pid`` from ``--query-compute-apps`` (MiB) and what it is.

    The second item is ``process`` when the PID is listed, ``not listed (apps: ...)`` when
    it is not (a container with its own PID namespace), ``n/a`` without nvidia-smi.
    """
    rows = _smi("--query-compute-apps=pid,used_memory")
    if rows is None:
        return None, "n/a"
    mine = [_number(row[1]) or 0.0 for row in rows if len(row) >= 2 and row[0] == str(pid)]
    if mine:
        return sum(mine), "process"
    listed = ", ".join(f"{r[0]}={r[1]}" for r in rows if len(r) >= 2) or "none"
    return None, f"not listed (apps: {listed})"


# -- helpers ------------------------------------------------------------------------------


def show(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def attempt(errors: dict[str, str], name: str, step: Callable[[], T]) -> T | None:
    """Run one step; a failure is printed and recorded, and the next steps still run."""
    print(f"\n== {name}", flush=True)
    try:
        return step()
    except Exception as err:
        traceback.print_exc()
        errors[name] = f"{type(err).__name__}: {err}"
        print(f"!! {name} failed: {errors[name]}", flush=True)
        return None


def in_child(step: Callable[..., T], *args: Any) -> T:
    """Run ``step(*args)`` in a fresh process: its CUDA context goes when it exits, so the
    server's figures later on are not mixed with this process's."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(step, *args).result()


def _rates(run: LoadRun) -> dict[str, Any]:
    return {
        "requests": len(run.records),
        "tokens": run.tokens,
        "seconds": run.seconds,
        "tokens_per_s": run.tokens_per_s,
    }


# -- throughput ---------------------------------------------------------------------------


def direct_tokens(path: Path, n_gpu_layers: int, requests: int) -> dict[str, Any]:
    """Tokens/s of 64-token completions calling llama_cpp in-process, one after another."""
    device_before = smi_device_used_mb()
    started = time.perf_counter()
    with in_process(path, n_gpu_layers=n_gpu_layers) as llm:
        load_s = time.perf_counter() - started
        loaded_vram = smi_device_used_mb()
        warmup = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS}
        run = direct_run(llm, completion_bodies(None, MAX_TOKENS, requests), warmup=warmup)
    # What the loaded copy adds to the device (memory.used delta): weights, KV cache,
    # compute buffers and this fresh process's CUDA context.
    delta = None
    if loaded_vram is not None and device_before is not None:
        delta = loaded_vram - device_before
    result = {"n_gpu_layers": n_gpu_layers} | _rates(run)
    result |= {"requests_per_s": run.requests_per_s, "load_s": load_s, "vram_delta_mb": delta}
    print(
        f"direct n_gpu_layers={n_gpu_layers}: {run.tokens_per_s:.1f} tokens/s "
        f"({requests} requests, {run.tokens} tokens, {run.seconds:.1f} s; load {load_s:.1f} s; "
        f"VRAM +{show(result['vram_delta_mb'], '.0f')} MiB)",
        flush=True,
    )
    return result


async def served_tokens(url: str, member: str, requests: int, concurrency: int) -> dict[str, Any]:
    """Tokens/s of 64-token completions through the server with ``concurrency`` clients."""
    run = await completion_load(
        url,
        member,
        requests=requests,
        concurrency=concurrency,
        max_tokens=MAX_TOKENS,
        timeout_s=300,
    )
    result = {"concurrency": concurrency, "requests": requests, "failed": run.failed}
    result |= _rates(run) | {"requests_per_s": (requests - run.failed) / run.seconds}
    print(
        f"served c={concurrency}: {run.tokens_per_s:.1f} tokens/s ({requests} requests, "
        f"{run.failed} failed, {run.seconds:.1f} s)",
        flush=True,
    )
    return result


# -- GPU memory ---------------------------------------------------------------------------


def memory_snapshot(server: Server) -> dict[str, Any]:
    """The server's GPU figures next to nvidia-smi's, and its RSS."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        health = {m: client.get("/health/llm", params={"model": m}).json() for m in server.members}
        every = client.get("/health/llm/all").json()
    per_member = [health[m].get("gpu_memory_mb") for m in server.members]
    process_mb, source = smi_process_used_mb(server.pid)
    return {
        "health_gpu_large_gpu_memory_mb": health[MEMBER].get("gpu_memory_mb"),
        "health_gpu_large_memory_mb": health[MEMBER].get("memory_mb"),
        "health_members_gpu_memory_mb": (
            sum(per_member) if all(v is not None for v in per_member) else None
        ),
        "health_all_gpu_available": every.get("gpu_available"),
        "health_all_gpu_memory_mb": every.get("gpu_memory_mb"),
        "health_all_memory_mb": every.get("memory_mb"),
        "smi_process_mb": process_mb,
        "smi_process_source": source,
        "smi_device_used_mb": smi_device_used_mb(),
        "rss_mb": server.rss_bytes() / MIB,
    }


# The server's figures over nvidia-smi's: (key, numerator, denominator, label).
RATIOS = [
    ("ratio_all_vs_smi_process", "health_all_gpu_memory_mb", "smi_process_mb",
     "/health/llm/all / nvidia-smi process"),
    ("ratio_all_vs_smi_device", "health_all_gpu_memory_mb", "smi_device_used_mb",
     "/health/llm/all / nvidia-smi device"),
    ("ratio_gpu_large_vs_smi_process", "health_gpu_large_gpu_memory_mb", "smi_process_mb",
     f"/health/llm {MEMBER} / nvidia-smi process"),
    ("ratio_members_vs_smi_process", "health_members_gpu_memory_mb", "smi_process_mb",
     "all members' /health/llm / nvidia-smi process"),
]  # fmt: skip


def memory_check(server: Server) -> dict[str, Any]:
    """``memory_snapshot`` with the server's figures as ratios to nvidia-smi's, printed."""
    snap = memory_snapshot(server)
    snap |= {key: ratio(snap[a], snap[b]) for key, a, b, _ in RATIOS}
    print(
        f"/health/llm?model={MEMBER}: gpu_memory_mb {show(snap['health_gpu_large_gpu_memory_mb'])}"
        f", memory_mb {show(snap['health_gpu_large_memory_mb'])}; all members' gpu_memory_mb "
        f"{show(snap['health_members_gpu_memory_mb'])}"
    )
    print(
        f"/health/llm/all: gpu_available {snap['health_all_gpu_available']}, gpu_memory_mb "
        f"{show(snap['health_all_gpu_memory_mb'])}, memory_mb {show(snap['health_all_memory_mb'])}"
    )
    print(
        f"nvidia-smi: server pid used_memory {show(snap['smi_process_mb'])} MiB "
        f"({snap['smi_process_source']}), device memory.used "
        f"{show(snap['smi_device_used_mb'])} MiB; server RSS {snap['rss_mb']:.0f} MiB"
    )
    for key, _, _, label in RATIOS:
        print(f"  {label}: {show(snap[key], '.3f')}")
    return snap


# -- reloads ------------------------------------------------------------------------------


async def _reload(admin_url: str, poll_s: float) -> Reloaded:
    async with httpx.AsyncClient(timeout=60) as client:
        return await reload_member(client, admin_url, MEMBER, poll_s=poll_s)


def reload_leak(server: Server, reloads: int) -> dict[str, Any]:
    """memory.used (and the server's own figures) before and after sequential reloads."""
    time.sleep(1.0)
    before = memory_snapshot(server)
    done: list[Reloaded] = []
    device_after, process_after = [], []
    for i in range(reloads):
        done.append(asyncio.run(_reload(server.admin_url, poll_s=0.05)))
        time.sleep(0.5)  # the old copy closes once idle: let its memory go back
        device_after.append(smi_device_used_mb())
        process_after.append(smi_process_used_mb(server.pid)[0])
        print(
            f"  reload {i + 1}/{reloads}: {done[-1].outcome} in {done[-1].seconds:.2f} s; "
            f"memory.used {show(device_after[-1], '.0f')} MiB, server pid "
            f"{show(process_after[-1], '.0f')} MiB",
            flush=True,
        )
    time.sleep(1.0)
    after = memory_snapshot(server)

    def change(stem: str, key: str) -> dict[str, Any]:
        old, new = before[key], after[key]
        return {f"{stem}_mb_before": old, f"{stem}_mb_after": new, f"{stem}_ratio": ratio(new, old)}

    outcomes = [r.outcome for r in done]
    result = {
        "reloads": reloads,
        "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "errors": [f"reload {i + 1}: {r.error}" for i, r in enumerate(done) if r.error],
        "seconds_each": [r.seconds for r in done],
        **change("device_used", "smi_device_used_mb"),
        "device_used_mb_series": device_after,
        **change("process", "smi_process_mb"),
        "process_mb_series": process_after,
        "health_all_gpu_memory_mb_before": before["health_all_gpu_memory_mb"],
        "health_all_gpu_memory_mb_after": after["health_all_gpu_memory_mb"],
        "health_gpu_large_gpu_memory_mb_after": after["health_gpu_large_gpu_memory_mb"],
        **change("rss", "rss_mb"),
    }
    device_ratio = result["device_used_ratio"]
    result["within_tolerance"] = (
        abs(device_ratio - 1) <= VRAM_TOLERANCE if device_ratio is not None else None
    )
    print(
        f"{reloads} reloads: outcomes {result['outcomes']}; memory.used "
        f"{show(result['device_used_mb_before'], '.0f')} -> "
        f"{show(result['device_used_mb_after'], '.0f')} MiB (ratio "
        f"{show(device_ratio, '.3f')}, goal within {VRAM_TOLERANCE:.0%}); server pid "
        f"{show(result['process_mb_before'], '.0f')} -> {show(result['process_mb_after'], '.0f')}"
        f" MiB; RSS {before['rss_mb']:.0f} -> {after['rss_mb']:.0f} MiB"
    )
    return result


async def reload_under_load(url: str, admin_url: str, baseline_s: float) -> dict[str, Any]:
    """One reload of gpu-large while 4 clients send completions before, during and after."""
    stop = asyncio.Event()
    body = {"model": MEMBER, "prompt": "Reload me", "max_tokens": MAX_TOKENS, "temperature": 0.8}
    users = asyncio.create_task(
        closed_loop(
            url, until(stop, itertools.repeat(body)), concurrency=LOAD_CLIENTS, timeout_s=300
        )
    )
    await asyncio.sleep(baseline_s)
    steady = await asyncio.to_thread(smi_device_used_mb)
    with PeakSampler(smi_device_used_mb, 0.2) as sampler:
        reloaded = await _reload(admin_url, poll_s=0.02)
    await asyncio.sleep(baseline_s / 2)  # the clients keep going past the switch
    stop.set()
    records = (await users).records
    start, end = reloaded.started, reloaded.ended
    overlapping = [r for r in records if r.started <= end and r.ended >= start]
    failed = [r for r in records if r.status != 200]
    result = {
        "clients": LOAD_CLIENTS,
        "outcome": reloaded.outcome,
        "error": reloaded.error,
        "reload_s": reloaded.seconds,
        "requests": len(records),
        "requests_overlapping_reload": len(overlapping),
        "failed_requests": len(failed),
        "failed_statuses": sorted({r.status or 0 for r in failed}),  # 0: no answer
        "device_used_mb_steady": steady,
        "device_used_mb_peak_during_reload": sampler.peak,
    }
    print(
        f"reload under {LOAD_CLIENTS} clients: {reloaded.outcome} in {reloaded.seconds:.2f} s; "
        f"requests {len(records)} ({len(overlapping)} overlapping the reload), failed "
        f"{len(failed)}; memory.used steady {show(steady, '.0f')} MiB, peak during reload "
        f"{show(sampler.peak, '.0f')} MiB"
    )
    return result


# -- report -------------------------------------------------------------------------------


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's rows: figure, value, goal, met (None: no goal or not measured)."""
    thr = results.get("throughput", {})
    gpu, cpu = thr.get("direct_gpu"), thr.get("direct_cpu")
    served = thr.get("served", {})
    mem = results.get("memory") or {}
    leak = results.get("reloads") or {}
    load = results.get("reload_under_load") or {}
    rows: list[dict[str, Any]] = []

    def row(figure: str, shown: str, goal: str = "", met: bool | None = None) -> None:
        rows.append({"figure": figure, "value": shown, "goal": goal, "met": met})

    offload = results["machine"]["gpu_offload"]
    row("llama_cpp GPU offload", str(offload), "True", bool(offload))
    gpu_tps = gpu["tokens_per_s"] if gpu else None
    row("direct tokens/s, n_gpu_layers=-1", show(gpu_tps))
    row("direct tokens/s, n_gpu_layers=0 (CPU)", show(cpu["tokens_per_s"] if cpu else None))
    row("GPU / CPU (direct)", show(thr.get("gpu_vs_cpu"), ".1f", "x"))
    for c in (1, LOAD_CLIENTS):
        cell = served.get(f"c{c}")
        row(
            f"served tokens/s, c={c} (/ direct GPU)",
            f"{show(cell['tokens_per_s'] if cell else None)} "
            f"({show(thr.get(f'served_c{c}_vs_direct_gpu'), '.2f')})",
        )
    row(
        f"/health/llm {MEMBER} gpu_memory_mb (weights + KV)",
        show(mem.get("health_gpu_large_gpu_memory_mb")),
    )
    row(
        "/health/llm/all gpu_memory_mb / nvidia-smi server pid",
        f"{show(mem.get('health_all_gpu_memory_mb'))} / {show(mem.get('smi_process_mb'))} = "
        f"{show(mem.get('ratio_all_vs_smi_process'), '.3f')}",
    )
    row(
        "all members' /health/llm / nvidia-smi server pid",
        f"{show(mem.get('health_members_gpu_memory_mb'))} / {show(mem.get('smi_process_mb'))} = "
        f"{show(mem.get('ratio_members_vs_smi_process'), '.3f')}",
    )
    row(
        "nvidia-smi memory.used before the run / with the server up",
        f"{show(results['machine'].get('smi_device_used_mb_idle'), '.0f')} / "
        f"{show(mem.get('smi_device_used_mb'), '.0f')}",
    )
    outcomes = leak.get("outcomes", {})
    n = leak.get("reloads", 0)
    row(
        f"reloads of {MEMBER} completed",
        f"{outcomes.get('completed', 0)} of {n}" if leak else "n/a",
        f"{n} of {n}",
        bool(leak) and outcomes.get("completed", 0) == n,
    )
    row(
        f"memory.used after {n} reloads / before",
        f"{show(leak.get('device_used_mb_before'), '.0f')} -> "
        f"{show(leak.get('device_used_mb_after'), '.0f')} MiB = "
        f"{show(leak.get('device_used_ratio'), '.3f')}",
        f"within {VRAM_TOLERANCE:.0%}",
        leak.get("within_tolerance"),
    )
    row(
        f"server pid used_memory after {n} reloads / before",
        f"{show(leak.get('process_mb_before'), '.0f')} -> "
        f"{show(leak.get('process_mb_after'), '.0f')} MiB = "
        f"{show(leak.get('process_ratio'), '.3f')}",
    )
    row(
        f"reload under {LOAD_CLIENTS} clients: failed requests",
        f"{load['failed_requests']} of {load['requests']} "
        f"({load['requests_overlapping_reload']} during it; {load['outcome']})"
        if load
        else "n/a",
        "0",
        (load["failed_requests"] == 0 and load["outcome"] == "completed") if load else False,
    )
    row(
        "memory.used peak during that reload (steady)",
        f"{show(load.get('device_used_mb_peak_during_reload'), '.0f')} "
        f"({show(load.get('device_used_mb_steady'), '.0f')}) MiB",
    )
    return rows


def markdown(results: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    machine, settings = results["machine"], results["settings"]
    gpus = machine.get("gpus") or []
    name = ", ".join(f"{g.get('name')} (driver {g.get('driver_version')})" for g in gpus)
    lines = [
        f"## GPU ({name or 'no GPU: n/a'}, {machine['cpus']} CPU cores, Python "
        f"{machine['python']}, llama-cpp-python {machine['llama_cpp']})",
        "",
        f"`{MEMBER}`: generated random-weight llama model, {settings['n_embd']} wide, "
        f"{settings['n_layer']} layers, f32, {settings['file_mb']:.0f} MB; served beside the "
        f"three demo members, every member with `n_gpu_layers = -1`. {MAX_TOKENS}-token "
        f"completions, `n_ctx` {N_CTX}, temperature 0.8; direct GPU and served cells "
        f"{settings['gpu_requests']} requests each, direct CPU {settings['cpu_requests']}. "
        f"Memory in MiB.",
        "",
        "| figure | value | goal | |",
        "|---|---|---|---|",
    ]
    for r in rows:
        mark = {True: "ok", False: "MISSED", None: ""}[r["met"]]
        lines.append(f"| {r['figure']} | {r['value']} | {r['goal']} | {mark} |")
    return "\n".join(lines)


def machine_info(offload: bool) -> dict[str, Any]:
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return {
        "gpus": smi_gpus(),
        "smi_device_used_mb_idle": smi_device_used_mb(),
        "gpu_offload": offload,
        "llama_cpp": getattr(llama_cpp, "__version__", "?"),
        "llama_system_info": info.decode(errors="replace") if isinstance(info, bytes) else info,
    } | machine()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="go on when llama_cpp cannot offload to a GPU (smoke test of the script)",
    )
    parser.add_argument("--size", choices=sorted(PLANS), default="large", help="gpu-large's size")
    parser.add_argument("--requests", type=int, help="per direct-GPU and served cell")
    parser.add_argument("--cpu-requests", type=int, help="for the direct CPU figure")
    parser.add_argument("--reloads", type=int, default=10, help="sequential reloads")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON file")
    args = parser.parse_args()
    plan = PLANS[args.size]
    gpu_requests = args.requests or plan.gpu_requests
    served_requests = args.requests or plan.served_requests
    cpu_requests = args.cpu_requests or plan.cpu_requests

    import llama_cpp

    offload = bool(llama_cpp.llama_supports_gpu_offload())
    print(f"llama_cpp {getattr(llama_cpp, '__version__', '?')} from {llama_cpp.__file__}")
    print(f"llama_cpp.llama_supports_gpu_offload() = {offload}", flush=True)
    if not offload and not args.allow_cpu:
        print(
            "FAIL: this llama-cpp-python cannot offload to a GPU (a CPU build). Rebuild it "
            'with CMAKE_ARGS="-DGGML_CUDA=on" (benchmarks/gpu_check.sh does), or pass '
            "--allow-cpu to smoke-test the script without a GPU.",
            file=sys.stderr,
        )
        return 2
    host = machine_info(offload)
    print(f"nvidia-smi: {host['gpus'] if host['gpus'] is not None else 'n/a'}")
    print(f"llama.cpp system info: {host['llama_system_info']}", flush=True)

    errors: dict[str, str] = {}
    results: dict[str, Any] = {"machine": host, "size": args.size}
    expected_mb = expected_file_bytes(plan.model) / 1e6
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        workdir = Path(tmp)
        path = workdir / "models" / plan.model.filename
        started = time.perf_counter()
        write_model(plan.model, path)
        file_mb = path.stat().st_size / 1e6
        print(
            f"{MEMBER}: {plan.model.n_embd} wide, {plan.model.n_layer} layers, f32: "
            f"{file_mb:.1f} MB on disk (tensors {expected_mb:.1f} MB expected), written in "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
        if plan.file_mb_range and not plan.file_mb_range[0] <= file_mb <= plan.file_mb_range[1]:
            errors["model size"] = f"{file_mb:.0f} MB is outside {plan.file_mb_range} MB"
        models = {MEMBER: path} | ensure_demo_models(workdir / "models")
        results["settings"] = {
            **asdict(plan.model),
            "file_mb": file_mb,
            "expected_tensor_mb": expected_mb,
            "max_tokens": MAX_TOKENS,
            "n_ctx": N_CTX,
            "gpu_requests": gpu_requests,
            "served_requests": served_requests,
            "cpu_requests": cpu_requests,
            "reloads": args.reloads,
            "members": list(models),
        }

        throughput: dict[str, Any] = {"served": {}}
        results["throughput"] = throughput
        for key, layers, requests in (("gpu", -1, gpu_requests), ("cpu", 0, cpu_requests)):
            throughput[f"direct_{key}"] = attempt(
                errors,
                f"direct llama_cpp, n_gpu_layers={layers}",
                functools.partial(in_child, direct_tokens, path, layers, requests),
            )
        with contextlib.ExitStack() as running:
            server = attempt(
                errors,
                "start ensemble-ops serve",
                lambda: running.enter_context(
                    Server.start(workdir, models, model_fields={"n_gpu_layers": -1})
                ),
            )
            if server is not None:
                measure(server, results, errors, served_requests, args.reloads, plan.baseline_s)
        if server is not None:
            problems = server.error_lines()
            if problems:
                print(f"\nserver logged {len(problems)} error lines; the last ones:")
                print(*problems[-10:], sep="\n")
            results["server_error_lines"] = problems[-50:]

    gpu, cpu = throughput.get("direct_gpu"), throughput.get("direct_cpu")
    gpu_tps = gpu["tokens_per_s"] if gpu else None
    throughput["gpu_vs_cpu"] = ratio(gpu_tps, cpu["tokens_per_s"] if cpu else None)
    for c in (1, LOAD_CLIENTS):
        cell = throughput["served"].get(f"c{c}")
        throughput[f"served_c{c}_vs_direct_gpu"] = ratio(
            cell["tokens_per_s"] if cell else None, gpu_tps
        )
    print(
        f"\nratios: GPU/CPU {show(throughput['gpu_vs_cpu'], '.1f', 'x')}, served/direct-GPU "
        f"c=1 {show(throughput['served_c1_vs_direct_gpu'], '.2f')}, c={LOAD_CLIENTS} "
        f"{show(throughput[f'served_c{LOAD_CLIENTS}_vs_direct_gpu'], '.2f')}"
    )
    rows = goals(results)
    results |= {"goals": rows, "errors": errors, "when": utc_now()}
    print("\n" + markdown(results, rows) + "\n")
    save(args.output, results)
    missed = [r["figure"] for r in rows if r["met"] is False]
    if not offload:
        missed = [m for m in missed if m != "llama_cpp GPU offload"]  # --allow-cpu said so
    for figure in missed:
        print(f"MISSED: {figure}")
    for name, error in errors.items():
        print(f"FAILED: {name}: {error}")
    return 1 if missed or errors else 0


def measure(
    server: Server,
    results: dict[str, Any],
    errors: dict[str, str],
    requests: int,
    reloads: int,
    baseline_s: float,
) -> None:
    """Every step that needs the server, each an ``attempt``."""

    def served(concurrency: int) -> dict[str, Any]:
        return asyncio.run(served_tokens(server.url, MEMBER, requests, concurrency))

    for c in (1, LOAD_CLIENTS):
        results["throughput"]["served"][f"c{c}"] = attempt(
            errors, f"served, concurrency {c}", functools.partial(served, c)
        )
    results["memory"] = attempt(errors, "GPU memory figures", lambda: memory_check(server))
    results["reloads"] = attempt(
        errors, f"{reloads} sequential reloads", lambda: reload_leak(server, reloads)
    )
    results["reload_under_load"] = attempt(
        errors,
        "reload under load",
        lambda: asyncio.run(reload_under_load(server.url, server.admin_url, baseline_s)),
    )


if __name__ == "__main__":
    sys.exit(main())
