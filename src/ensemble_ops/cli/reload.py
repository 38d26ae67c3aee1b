"""``ensemble-ops reload MODEL``: ask a running server to reload a member, and follow it;
``promote`` and ``abort`` decide a running rollout.

They talk to the admin listener (``ensemble_ops.cli.admin``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from ensemble_ops.cli.admin import AdminCallError, AdminClient, AdminUnreachableError

__all__ = ["run_decision", "run_reload"]

_BAR = 30


def _post(
    admin: AdminClient, path: str, body: dict[str, Any], what: str, out: TextIO
) -> dict[str, Any] | None:
    """POST to an admin route: the reload status it answers, or None once the refusal or
    the unreachable server has been said."""
    try:
        status: dict[str, Any] = admin.call("POST", path, body)
    except AdminCallError as err:
        print(f"ensemble-ops: {what} refused: {err}", file=out)
        return None
    except AdminUnreachableError as err:
        print(f"ensemble-ops: {err}", file=out)
        return None
    return status


class _Progress:
    """How a reload's progress is shown: a bar redrawn in place on a terminal; elsewhere (a
    CI log, a pipe) one line each time the state, the message, a rollout's weight or a
    gate's verdict changes."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._live = out.isatty()
        self._last: tuple[object, ...] | None = None

    def show(self, status: dict[str, Any]) -> None:
        if self._live:
            bar = round(_BAR * status["progress_percent"] / 100)
            line = f"\r[{'#' * bar}{' ' * (_BAR - bar)}] {_describe(status, width=60)}"
            self._out.write(line + " " * 8)
            self._out.flush()
            return
        rollout = status.get("rollout") or {}
        seen = (
            status["state"],
            status["message"],
            rollout.get("weight_percent"),
            tuple(g["verdict"] for g in (rollout.get("gates") or {}).values()),
        )
        if seen != self._last:
            self._last = seen
            print(_describe(status, width=None), file=self._out, flush=True)

    def done(self) -> None:
        if self._live:
            self._out.write("\n")


def _describe(status: dict[str, Any], *, width: int | None) -> str:
    """Progress, state and message, or a rollout's weight and each gate's verdict."""
    head = f"{status['progress_percent']:5.1f}% "
    rollout = status.get("rollout")
    if rollout is None:
        message = status["message"] if width is None else f"{status['message'][:width]:<{width}}"
        return f"{head}{status['state']:<10} {message}"
    gates = " ".join(f"{name}={g['verdict']}" for name, g in rollout["gates"].items())
    copies = rollout["copies"]
    text = (
        f"{head}{status['state']:<18} weight {rollout['weight_percent']:5.1f}% "
        f"step {rollout['step'] or '-'} answers {copies['candidate']['requests']}/"
        f"{copies['stable']['requests']} {gates or 'gates: waiting for data'}"
    )
    return text if width is None else text[:160]


def run_reload(
    model: str,
    *,
    admin: AdminClient,
    path: str | None,
    wait: bool,
    rollout: dict[str, Any] | None = None,
    poll_s: float = 0.25,
    out: TextIO = sys.stderr,
) -> int:
    """Start the reload (``rollout``: the body's rollout fields); with ``wait`` show progress,
    and a rollout's weight and gates, until it ends. Returns the exit status."""
    body: dict[str, Any] = {"path": path} if path else {}
    body |= rollout or {}
    status = _post(admin, f"/admin/models/{model}/reload", body, "reload", out)
    if status is None:
        return 1
    if not wait:
        print(json.dumps(status), file=sys.stdout)
        return 0
    progress = _Progress(out)
    while True:
        progress.show(status)
        if status["state"] in ("completed", "failed", "rolled_back"):
            break
        time.sleep(poll_s)
        try:
            status = admin.call("GET", f"/health/llm/reload/{model}")
        except (AdminCallError, AdminUnreachableError) as err:
            progress.done()
            print(f"ensemble-ops: lost the server while waiting: {err}", file=out)
            return 1
    progress.done()
    if status["state"] in ("failed", "rolled_back"):
        what = "failed" if status["state"] == "failed" else "rolled back"
        print(f"ensemble-ops: reload of {model} {what}: {status['error']}", file=out)
        return 1
    print(f"ensemble-ops: reload of {model} completed: {status['message']}", file=out)
    return 0


def run_decision(model: str, decision: str, *, admin: AdminClient, out: TextIO = sys.stderr) -> int:
    """``promote`` or ``abort`` the member's running rollout. Returns the exit status."""
    status = _post(admin, f"/admin/models/{model}/{decision}", {}, decision, out)
    if status is None:
        return 1
    print(f"ensemble-ops: {decision} of {model} accepted ({status['state']})", file=out)
    return 0
