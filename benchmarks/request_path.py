"""The request path's own cost on a real member: streamed time to first token and latency,
non-streamed latency, against another checkout of the service in the same run.

Both servers serve the real instruct member alone (SmolLM2-135M, one slot, so a request
never shares a step) with the response cache off; rounds alternate between them so drift on
a busy machine falls on both alike. Each round sends the same prompts one at a time at
temperature 0 (so both servers generate the very same tokens), and the figure of a round is
its median; the report gives the median of the rounds and the ratio of this checkout to the
other (1.00: no change).

    python -m benchmarks.request_path --baseline ../other-checkout/src

Writes ``benchmarks/results/request_path.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import httpx

from ensemble_ops.serving.real_models import SMOLLM2_135M, ensure_real_models

from .harness import RESULTS_DIR, Server, machine, median, ratio, save, send, utc_now

RESULTS = RESULTS_DIR / "request_path.json"
QUESTIONS = [
    "Name a fruit that is red.",
    "What colour is the sky on a clear day?",
    "Say hello in French.",
    "How many legs does a spider have?",
    "Name a planet in the solar system.",
    "What is two plus two?",
]


def _body(question: str, *, stream: bool) -> dict[str, Any]:
    return {
        "model": SMOLLM2_135M.name,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 32,
        "temperature": 0,
        "stream": stream,
    }


async def one_round(url: str) -> dict[str, float]:
    """Each question streamed, then not: the round's medians in seconds."""
    ttft, streamed, whole = [], [], []
    async with httpx.AsyncClient(timeout=120) as client:
        for question in QUESTIONS:
            record = await send(client, f"{url}/v1/chat/completions", _body(question, stream=True))
            if not record.ok or record.ttft_s is None:
                raise RuntimeError(f"a streamed request failed: {record.error}")
            ttft.append(record.ttft_s)
            streamed.append(record.latency_s)
            record = await send(client, f"{url}/v1/chat/completions", _body(question, stream=False))
            if not record.ok:
                raise RuntimeError(f"a request failed: {record.error}")
            whole.append(record.latency_s)
    return {
        "stream_ttft_s": median(ttft),
        "stream_latency_s": median(streamed),
        "completion_latency_s": median(whole),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--baseline", type=Path, help="the src/ folder of the checkout to compare with"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    path = ensure_real_models()[SMOLLM2_135M.name]
    fields = {"parallel": 1}
    sections = {"cache": {"enabled": False}}
    sides: dict[str, list[dict[str, float]]] = {"this": []}
    with contextlib.ExitStack() as stack:
        servers = {
            "this": stack.enter_context(
                Server.start(
                    Path(stack.enter_context(tempfile.TemporaryDirectory())),
                    {SMOLLM2_135M.name: path},
                    model_fields=fields,
                    sections=sections,
                )
            )
        }
        if args.baseline is not None:
            sides["baseline"] = []
            servers["baseline"] = stack.enter_context(
                Server.start(
                    Path(stack.enter_context(tempfile.TemporaryDirectory())),
                    {SMOLLM2_135M.name: path},
                    model_fields=fields,
                    sections=sections,
                    env={"PYTHONPATH": str(args.baseline.resolve())},
                    admin=False,  # an older checkout may have no admin listener
                )
            )
        for server in servers.values():  # warm both: the first request pays for page-ins
            asyncio.run(one_round(server.url))
        for i in range(args.rounds):
            for side, server in servers.items():
                figures = asyncio.run(one_round(server.url))
                sides[side].append(figures)
                print(
                    f"round {i + 1} {side:<8} "
                    + "  ".join(f"{k} {v:.3f}" for k, v in figures.items())
                )
    summary = {
        side: {key: median([r[key] for r in rounds]) for key in rounds[0]}
        for side, rounds in sides.items()
    }
    result: dict[str, Any] = {
        "run_at": utc_now(),
        "machine": machine(),
        "rounds": args.rounds,
        "medians": summary,
        "per_round": sides,
    }
    if "baseline" in summary:
        result["ratio_this_to_baseline"] = {
            key: ratio(summary["this"][key], summary["baseline"][key]) for key in summary["this"]
        }
        for key, value in result["ratio_this_to_baseline"].items():
            print(
                f"{key}: this {summary['this'][key]:.3f} s, baseline "
                f"{summary['baseline'][key]:.3f} s, ratio {value:.3f}"
            )
    save(args.output, result)


if __name__ == "__main__":
    main()
