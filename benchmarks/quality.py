"""Quality-gate benchmark: what the gate costs a reload, and what it catches under load.

Starts the default ensemble (``ensemble-ops serve`` with no config: the real models with
their shipped golden sets) and measures, for each member:

- a reload without the gate (``quality: false``), the first reload with it (the new copy
  and the serving one are scored), and a second one (the serving copy's score is known):
  the gate's seconds and its share of the reload;
- each member's pass rate on its shipped set.

Then, with two clients sending chats to the instruct member, reloads it with the generated
``demo-base`` file (random weights, a chat template: it passes the warm-up): the gate must
roll it back, and no request may fail (goal 0).

Prints a table and writes ``benchmarks/results/quality.json``. Run with ``nox -s bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import (
    RESULTS_DIR,
    Server,
    closed_loop,
    machine,
    reload_member,
    save,
    until,
    utc_now,
)
from ensemble_ops.serving.demo import DEMO_MEMBERS, write_model
from ensemble_ops.serving.real_models import SMOLLM2_135M

RESULTS = RESULTS_DIR / "quality.json"
DEMO_BASE = next(m for m in DEMO_MEMBERS if m.name == "demo-base")


async def reload(server: Server, member: str, body: dict[str, Any]) -> dict[str, Any]:
    """One reload through the admin listener: its final status and wall time."""
    async with httpx.AsyncClient(timeout=60) as admin:
        done = await reload_member(admin, server.admin_url, member, body=body, poll_s=0.1)
    if done.final is None:
        raise SystemExit(f"{member}: reload {done.outcome}: {done.error}")
    return done.final | {"wall_s": round(done.seconds, 2)}


async def gate_cost(server: Server, member: str) -> dict[str, Any]:
    plain = await reload(server, member, {"quality": False})
    first = await reload(server, member, {})
    again = await reload(server, member, {})
    for status in (plain, first, again):
        if status["state"] != "completed":
            raise SystemExit(f"{member}: reload {status['state']}: {status['error']}")
    return {
        "reload_without_gate_s": plain["wall_s"],
        "first_reload_s": first["wall_s"],
        "first_gate_s": first["quality"]["seconds"],
        "first_gate_share": round(first["quality"]["seconds"] / first["wall_s"], 3),
        "later_reload_s": again["wall_s"],
        "later_gate_s": again["quality"]["seconds"],
        "later_gate_share": round(again["quality"]["seconds"] / again["wall_s"], 3),
        "golden_set": first["quality"]["golden_set"],
        "cases": first["quality"]["cases"],
        "pass_rate": first["quality"]["pass_rate"],
        "serving_pass_rate": first["quality"]["stable_pass_rate"],
        "min_pass_rate": first["quality"]["min_pass_rate"],
    }


async def bad_copy_under_load(server: Server, clients: int) -> dict[str, Any]:
    stop = asyncio.Event()
    body = {
        "model": SMOLLM2_135M.name,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 8,
        "temperature": 0.8,
    }
    users = asyncio.create_task(
        closed_loop(
            server.url,
            until(stop, itertools.repeat(body)),
            concurrency=clients,
            path="/v1/chat/completions",
        )
    )
    await asyncio.sleep(2)
    status = await reload(server, SMOLLM2_135M.name, {"path": DEMO_BASE.filename})
    await asyncio.sleep(2)
    stop.set()
    load = await users
    return {
        "state": status["state"],
        "error": status["error"],
        "pass_rate": status["quality"]["pass_rate"] if status["quality"] else None,
        "reload_s": status["wall_s"],
        "requests": len(load.records),
        "failed": load.failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_model(DEMO_BASE, workdir / DEMO_BASE.filename)
        env = {"ENSEMBLE_OPS_RELOAD__MODEL_DIR": str(workdir)}  # reload paths: demo-base here
        with Server.start(workdir, env=env) as server:
            members = {member: asyncio.run(gate_cost(server, member)) for member in server.members}
            caught = asyncio.run(bad_copy_under_load(server, args.clients))
    result = {"machine": machine(), "when": utc_now(), "members": members, "bad_copy": caught}
    save(RESULTS, result)
    print(f"{'member':<14} {'set':<16} {'pass':>5} {'reload':>7} {'gate 1st':>9} {'gate':>6}")
    for member, row in members.items():
        print(
            f"{member:<14} {row['golden_set']:<16} {row['pass_rate']:>5.0%} "
            f"{row['reload_without_gate_s']:>6.1f}s "
            f"{row['first_gate_s']:>5.1f}s {row['first_gate_share']:>3.0%} "
            f"{row['later_gate_s']:>5.1f}s {row['later_gate_share']:>3.0%}"
        )
    print(
        f"bad copy under load: {caught['state']} ({caught['error']}); "
        f"{caught['failed']} of {caught['requests']} requests failed"
    )


if __name__ == "__main__":
    main()
