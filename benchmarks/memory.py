"""Memory of a batching member against llama-server with as many slots, same file and context.

The memory a member adds is the server's RSS with the member loaded minus its RSS with only
the smallest demo member (the Python process, the app and a 0.7 MB model); both after one
answer, so the weights' pages that a request touches are counted. llama-server's figure is
its whole RSS with ``-np N -c n_ctx x N``, after one answer too. Writes
``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import psutil

from ensemble_ops.serving.demo import ensure_demo_models
from ensemble_ops.serving.real_models import SMOLLM2_135M, ensure_real_models

from .real_models import llama_server
from .serving import N_CTX, _stop, start_server

RESULTS = Path(__file__).parent / "results" / "memory.json"


def _rss_after_one_answer(process: Any, url: str, model: str) -> int:
    body = {"model": model, "prompt": "Hello", "max_tokens": 8}
    httpx.post(f"{url}/v1/completions", json=body, timeout=120).raise_for_status()
    return int(psutil.Process(process.pid).memory_info().rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    path = ensure_real_models()[SMOLLM2_135M.name]
    fields = {"parallel": args.parallel}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = ensure_demo_models(work / "demo")["demo-tiny"]
        process, url = start_server({"demo-tiny": tiny}, args.threads, work, model_fields=fields)
        try:
            base = _rss_after_one_answer(process, url, "demo-tiny")
        finally:
            _stop(process)
        process, url = start_server({"smollm2": path}, args.threads, work, model_fields=fields)
        try:
            loaded = _rss_after_one_answer(process, url, "smollm2")
        finally:
            _stop(process)
    built = subprocess.run(
        ["bash", str(Path(__file__).parent / "build_llama_server.sh")],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"PYTHON": sys.executable},
    )
    binary = Path(built.stdout.strip().splitlines()[-1])
    server, server_url = llama_server(binary, path, args.parallel, args.threads)
    try:
        peer = _rss_after_one_answer(server, server_url, "peer")
    finally:
        _stop(server)
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
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
