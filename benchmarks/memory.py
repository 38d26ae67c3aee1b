"""Memory of a batching member against llama-server with as many slots, same file and context.

The memory a member adds is the server's RSS with the member loaded minus its RSS with only
the smallest demo member (the Python process, the app and a 0.7 MB model); both after one
answer, so the weights' pages that a request touches are counted. llama-server's figure is
its whole RSS with ``-np N -c n_ctx x N``, after one answer too. Writes
``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import httpx

from benchmarks.harness import (
    N_CTX,
    RESULTS_DIR,
    Server,
    Service,
    build_llama_server,
    llama_server,
    save,
)
from ensemble_ops.serving.demo import ensure_demo_models
from ensemble_ops.serving.real_models import SMOLLM2_135M, ensure_real_models

RESULTS = RESULTS_DIR / "memory.json"


def _rss_after_one_answer(server: Service, model: str) -> int:
    body = {"model": model, "prompt": "Hello", "max_tokens": 8}
    httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).raise_for_status()
    return server.rss_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON file")
    args = parser.parse_args()
    path = ensure_real_models()[SMOLLM2_135M.name]
    binary = build_llama_server()
    fields = {"parallel": args.parallel}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = ensure_demo_models(work / "demo")["demo-tiny"]
        members = {"demo-tiny": tiny, "smollm2": path}
        rss = {}
        for name, model in members.items():
            with Server.start(
                work, {name: model}, threads=args.threads, model_fields=fields
            ) as server:
                rss[name] = _rss_after_one_answer(server, name)
        with llama_server(
            binary, path, slots=args.parallel, threads=args.threads, workdir=work
        ) as cpp:
            peer = _rss_after_one_answer(cpp, "peer")
    base, loaded = rss["demo-tiny"], rss["smollm2"]
    member = loaded - base
    result = {
        "model": SMOLLM2_135M.name,
        "parallel": args.parallel,
        "n_ctx_per_slot": N_CTX,
        "ensemble_ops_rss_base_mib": base / 2**20,
        "ensemble_ops_rss_loaded_mib": loaded / 2**20,
        "member_adds_mib": member / 2**20,
        "llama_server_rss_mib": peer / 2**20,
        "member_over_llama_server": member / peer,
    }
    print(
        f"{SMOLLM2_135M.name}, {args.parallel} slots x {N_CTX} tokens: the member adds "
        f"{member / 2**20:.0f} MiB to ensemble-ops ({base / 2**20:.0f} -> "
        f"{loaded / 2**20:.0f}); llama-server -np {args.parallel}: {peer / 2**20:.0f} MiB "
        f"(ratio {member / peer:.2f})"
    )
    save(args.output, result)


if __name__ == "__main__":
    main()
