"""Real-model throughput: ensemble-ops against four peers on the same GGUF files, same run.

For each real member of the default ensemble (SmolLM2-135M-Instruct, Gemma 3 270M), measures
completion tokens per second at concurrency 1, 4 and 8 of:

- ``ensemble-ops`` serving the member (``ensemble-ops serve --config``);
- direct ``llama_cpp`` calls in this process (one at a time: concurrency 1 only);
- ``python -m llama_cpp.server`` (from ``llama-cpp-python[server]``);
- llama.cpp's C++ ``llama-server`` with one slot (``-np 1``), built from the source the
  installed llama-cpp-python vendors (``benchmarks/build_llama_server.sh``, cached);
- ``llama-server -np N`` at concurrency N.

The instruct model gets 64-token chat completions, the base model 64-token text completions
(what each is for). Every system gets the same prompts, threads, context per slot and sampler
(temperature 0.7, top_p 0.95, top_k 40, min_p 0.05: llama-cpp-python's defaults, set
explicitly on llama-server, whose own defaults differ). Tokens are the ``usage`` each system
reports. No request carries a seed: sampled requests are never cached, so every system
generates every answer. Results go to ``benchmarks/results/real_models.json`` and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ensemble_ops.serving.real_models import REAL_MEMBERS, RealModel, ensure_real_models

from .serving import N_CTX, _free_port, _stop, _wait_until_up, start_peer, start_server

RESULTS = Path(__file__).parent / "results" / "real_models.json"
MAX_TOKENS = 64
CONCURRENCY = (1, 4, 8)
SAMPLER = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05}
TOPICS = [
    "the sea", "mountains", "a library", "the moon", "bread", "rivers", "a city at night",
    "trains", "winter", "bees", "a lighthouse", "chess", "rain", "the desert", "music", "maps",
]  # fmt: skip


def _prompt(model: RealModel, i: int) -> dict[str, Any]:
    """Request i's body: chat for the instruct model, text for the base model."""
    topic = TOPICS[i % len(TOPICS)]
    if model.instruct:
        return {"messages": [{"role": "user", "content": f"Write a short story about {topic}."}]}
    return {"prompt": f"Here is a short story about {topic}. Once upon a time,"}


async def served(url: str, model: RealModel, member: str, requests: int, c: int) -> float:
    """Completion tokens per second of ``requests`` requests sent by ``c`` clients."""
    path = "/v1/chat/completions" if model.instruct else "/v1/completions"
    counter = iter(range(requests))
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in counter:
            body = {"model": member, "max_tokens": MAX_TOKENS, **SAMPLER}
            answer = await http.post(path, json=body | _prompt(model, i))
            answer.raise_for_status()
            tokens += answer.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await http.post(path, json={"model": member, "max_tokens": 4} | _prompt(model, 0))
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(c)))
        return tokens / (time.perf_counter() - started)


def direct(path: Path, model: RealModel, requests: int, threads: int) -> float:
    """The same requests through llama-cpp-python's own API, one after another."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    try:
        run: Callable[..., Any] = (
            llm.create_chat_completion if model.instruct else llm.create_completion
        )
        run(max_tokens=4, **_prompt(model, 0))
        tokens = 0
        started = time.perf_counter()
        for i in range(requests):
            out = run(max_tokens=MAX_TOKENS, **SAMPLER, **_prompt(model, i))
            tokens += out["usage"]["completion_tokens"]
        return tokens / (time.perf_counter() - started)
    finally:
        llm.close()


def llama_server(binary: Path, path: Path, slots: int, threads: int) -> tuple[Any, str]:
    """The C++ server with ``slots`` slots of N_CTX tokens each."""
    port = _free_port()
    command = [
        str(binary), "-m", str(path), "-np", str(slots), "-c", str(N_CTX * slots),
        "-t", str(threads), "-tb", str(threads), "--port", str(port), "--log-disable",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait_until_up(process, url, lambda r: r.status_code == 200)
    return process, url


def _cell(name: str, tps: float) -> None:
    print(f"  {name:<34} {tps:8.1f} tok/s", flush=True)


def bench_model(
    model: RealModel, path: Path, binary: Path | None, requests: int, threads: int
) -> dict[str, Any]:
    """Every system on one member; tokens/s by system and concurrency."""
    print(f"{model.name} ({path.name})", flush=True)
    figures: dict[str, dict[str, float]] = {}

    def record(system: str, c: int, tps: float) -> None:
        figures.setdefault(system, {})[str(c)] = round(tps, 2)
        _cell(f"{system} c={c}", tps)

    record("direct", 1, direct(path, model, requests, threads))
    with tempfile.TemporaryDirectory() as work:
        # As many sequence slots as the most clients here, like llama-server -np N at c=N.
        fields = {"parallel": max(CONCURRENCY)}
        process, url = start_server({model.name: path}, threads, Path(work), model_fields=fields)
        try:
            for c in CONCURRENCY:
                record(
                    "ensemble_ops", c, asyncio.run(served(url, model, model.name, requests * c, c))
                )
        finally:
            _stop(process)
    peer = start_peer(path, threads)
    if peer is not None:
        try:
            for c in CONCURRENCY:
                tps = asyncio.run(served(peer[1], model, "peer", requests * c, c))
                record("llama_cpp_server", c, tps)
        finally:
            _stop(peer[0])
    if binary is not None:
        for slots in (1, *(c for c in CONCURRENCY if c > 1)):
            process, url = llama_server(binary, path, slots, threads)
            try:
                levels = CONCURRENCY if slots == 1 else (slots,)
                for c in levels:
                    tps = asyncio.run(served(url, model, "peer", requests * c, c))
                    record("llama_server_np1" if slots == 1 else "llama_server_npN", c, tps)
            finally:
                _stop(process)
    ours = figures["ensemble_ops"]
    ratios = {
        system: {c: round(ours[c] / value, 3) for c, value in cells.items() if c in ours}
        for system, cells in figures.items()
        if system != "ensemble_ops"
    }
    return {"tokens_per_s": figures, "ensemble_ops_over": ratios}


def markdown(results: dict[str, Any]) -> str:
    """One table per member: tokens/s, and ensemble-ops' ratio to each peer."""
    names = {
        "ensemble_ops": "ensemble-ops",
        "direct": "direct llama_cpp",
        "llama_cpp_server": "python -m llama_cpp.server",
        "llama_server_np1": "C++ llama-server -np 1",
        "llama_server_npN": "C++ llama-server -np N (at c=N)",
    }
    out = []
    for member, data in results["models"].items():
        out += [f"**{member}** (tokens/s; ratio = ensemble-ops / that system)", ""]
        out += ["| system | c=1 | c=4 | c=8 |", "|---|---|---|---|"]
        for system, label in names.items():
            cells = data["tokens_per_s"].get(system)
            if cells is None:
                continue
            ratio = data["ensemble_ops_over"].get(system, {})
            row = []
            for c in CONCURRENCY:
                value = cells.get(str(c))
                text = "" if value is None else f"{value:.1f}"
                if value is not None and str(c) in ratio:
                    text += f" ({ratio[str(c)]:.2f}x)"
                row.append(text)
            out.append(f"| {label} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=6, help="per client in each cell")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-cpp", action="store_true", help="skip the C++ llama-server")
    parser.add_argument(
        "--models", nargs="*", default=[m.name for m in REAL_MEMBERS], help="members to measure"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    paths = ensure_real_models()
    binary = None
    if not args.no_cpp:
        build = Path(__file__).parent / "build_llama_server.sh"
        built = subprocess.run(
            ["bash", str(build)],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ | {"PYTHON": sys.executable},
        )
        binary = Path(built.stdout.strip().splitlines()[-1])
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "settings": {
            "max_tokens": MAX_TOKENS,
            "n_ctx_per_slot": N_CTX,
            "threads": args.threads,
            "requests_per_client": args.requests,
            "sampler": SAMPLER,
        },
        "models": {
            model.name: bench_model(model, paths[model.name], binary, args.requests, args.threads)
            for model in REAL_MEMBERS
            if model.name in args.models
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
