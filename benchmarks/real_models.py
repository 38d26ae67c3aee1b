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
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    N_CTX,
    RESULTS_DIR,
    Server,
    Service,
    build_llama_server,
    closed_loop,
    direct_run,
    in_process,
    llama_cpp_server,
    llama_server,
    save,
)
from ensemble_ops.serving.real_models import REAL_MEMBERS, RealModel, ensure_real_models

RESULTS = RESULTS_DIR / "real_models.json"
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


def _bodies(model: RealModel, member: str, count: int) -> list[dict[str, Any]]:
    return [
        {"model": member, "max_tokens": MAX_TOKENS, **SAMPLER} | _prompt(model, i)
        for i in range(count)
    ]


async def served(url: str, model: RealModel, member: str, requests: int, c: int) -> float:
    """Completion tokens per second of ``requests`` requests sent by ``c`` clients."""
    run = await closed_loop(
        url,
        _bodies(model, member, requests),
        concurrency=c,
        path="/v1/chat/completions" if model.instruct else "/v1/completions",
        warmup={"model": member, "max_tokens": 4} | _prompt(model, 0),
        timeout_s=600,
    )
    if run.failed:
        raise RuntimeError(f"{run.failed} of {requests} requests failed")
    return run.tokens_per_s


def direct(path: Path, model: RealModel, requests: int, threads: int) -> float:
    """The same requests through llama-cpp-python's own API, one after another."""
    with in_process(path, threads=threads) as llm:
        warmup = {"max_tokens": 4} | _prompt(model, 0)
        return direct_run(llm, _bodies(model, "direct", requests), warmup=warmup).tokens_per_s


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

    def measure(system: str, server: Service, levels: tuple[int, ...]) -> None:
        for c in levels:
            record(system, c, asyncio.run(served(server.url, model, "peer", requests * c, c)))

    record("direct", 1, direct(path, model, requests, threads))
    with tempfile.TemporaryDirectory() as work:
        workdir = Path(work)
        # As many sequence slots as the most clients here, like llama-server -np N at c=N.
        fields = {"parallel": max(CONCURRENCY)}
        with Server.start(
            workdir, {model.name: path}, threads=threads, model_fields=fields
        ) as server:
            for c in CONCURRENCY:
                tps = asyncio.run(served(server.url, model, model.name, requests * c, c))
                record("ensemble_ops", c, tps)
        with llama_cpp_server(path, threads=threads, workdir=workdir) as peer:
            if peer is not None:
                measure("llama_cpp_server", peer, CONCURRENCY)
        for slots in (1, *(c for c in CONCURRENCY if c > 1)):
            if binary is None:  # --no-cpp
                break
            with llama_server(binary, path, slots=slots, threads=threads, workdir=workdir) as cpp:
                if slots == 1:  # -np 1 at every level; -np N at c=N only
                    measure("llama_server_np1", cpp, CONCURRENCY)
                else:
                    measure("llama_server_npN", cpp, (slots,))
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
    binary = None if args.no_cpp else build_llama_server()
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
    save(args.output, results)
    print(markdown(results))


if __name__ == "__main__":
    main()
