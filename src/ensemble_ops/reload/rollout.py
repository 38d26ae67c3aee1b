"""A running rollout: the new copy's window against the old one's, and the checking loop.

The rollout's states in the machine (``shadowing``, ``canary``, ``awaiting_promotion``) each
hold on :func:`hold_until_judged`: it checks the gates every moment until they pass, fail
past the failure budget, an operator promotes or aborts, or the deadline passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import anyio

from ensemble_ops.config import RolloutSpec
from ensemble_ops.events import (
    Copy,
    GateJudged,
    InferenceFailed,
    InferenceFinished,
    ShadowFinished,
)
from ensemble_ops.reload.gates import GateResult, Window, judge
from ensemble_ops.reload.status import RolloutStatus

__all__ = ["Decision", "LiveRollout", "Outcome", "failed_gates", "hold_until_judged"]

Decision = Literal["promote", "abort"]
Outcome = Literal["pass", "fail", "promote", "abort", "deadline"]

# Failures that say nothing about the copy: the request itself was wrong.
_CLIENT_ERRORS = frozenset({"context_length_exceeded", "invalid_value", "model_not_found"})


class LiveRollout:
    """One rollout's live state, fed by the member's events (from the event loop)."""

    def __init__(self, model: str, spec: RolloutSpec) -> None:
        self.model = model
        self.spec = spec
        self.deadline = time.monotonic() + spec.deadline_s
        self.weight_percent = 0.0
        self.shadow_percent = 0.0
        self.step: str | None = None
        self.awaiting: str | None = None
        self.window = Window()
        self.verdicts: dict[str, GateResult] = {}
        self.failed_checks = 0
        self.decision: Decision | None = None
        self._decided = anyio.Event()

    def open_window(self, *, keep_failures: bool = False) -> None:
        """Start counting afresh: a new step, or the next check after a failed one (both
        copies over the same new window)."""
        self.window = Window()
        if not keep_failures:
            self.verdicts, self.failed_checks = {}, 0

    def decide(self, decision: Decision) -> None:
        """An operator's promote or abort; the holding state acts on it at once."""
        self.decision = decision
        self._decided.set()

    async def wait_decision(self, timeout_s: float) -> Decision | None:
        with anyio.move_on_after(max(timeout_s, 0.0)):
            await self._decided.wait()
        return self.decision

    # -- what the copies did ---------------------------------------------------------------

    def on_finished(self, event: InferenceFinished) -> None:
        if event.model == self.model and not event.cached and event.outcome == "success":
            # Each copy on its own time: both share the machine's cores, so the waits for
            # the other copy's (or another member's) steps would blur the comparison.
            ttft = event.time_to_first_token_s
            self.window.answered(
                event.copy,
                event.latency_s - event.compute_wait_s,
                None if ttft is None else ttft - event.first_token_compute_wait_s,
                event.completion_tokens == 0,
            )

    def on_failed(self, event: InferenceFailed) -> None:
        if event.model == self.model and event.error_type not in _CLIENT_ERRORS:
            self.window.failed(event.copy)

    def on_shadow(self, event: ShadowFinished) -> None:
        if event.model != self.model:
            return
        copy: Copy = "candidate"
        if event.error_type is not None and event.error_type not in _CLIENT_ERRORS:
            self.window.failed(copy)
        elif event.error_type is None:
            self.window.answered(copy, event.latency_s, event.time_to_first_token_s, event.empty)

    def status(self) -> RolloutStatus:
        return RolloutStatus(
            kind=self.spec.kind,
            weight_percent=self.weight_percent,
            shadow_percent=self.shadow_percent,
            step=self.step,
            copies={
                "stable": self.window.figures("stable"),
                "candidate": self.window.figures("candidate"),
            },
            gates=dict(self.verdicts),
            failed_checks=self.failed_checks,
            awaiting=self.awaiting,
        )


async def hold_until_judged(live: LiveRollout, publish: Callable[[object], None]) -> Outcome:
    """Check the gates over ``live``'s window until there is an outcome. A check needs
    ``min_seconds`` and ``min_requests`` on the new copy, else it holds; a failed gate counts
    against the failure budget (consecutive checks, each over fresh answers)."""
    spec = live.spec
    interval = min(1.0, max(0.05, spec.min_seconds / 4))
    while True:
        decision = await live.wait_decision(min(interval, live.deadline - time.monotonic()))
        if decision is not None:
            return decision
        if time.monotonic() >= live.deadline:
            return "deadline"
        if live.window.age_s < spec.min_seconds:
            continue
        live.verdicts = judge(live.window, spec.gates, spec.min_requests)
        for gate, result in live.verdicts.items():
            publish(
                GateJudged(
                    live.model,
                    gate,
                    result.verdict,
                    result.candidate,
                    result.stable,
                    result.limit,
                    result.reason,
                )
            )
        verdicts = {result.verdict for result in live.verdicts.values()}
        if "fail" in verdicts:
            live.failed_checks += 1
            if live.failed_checks >= spec.failure_budget:
                return "fail"
            # The next check judges fresh answers: one bad moment is not counted twice.
            live.open_window(keep_failures=True)
        elif verdicts == {"pass"}:
            return "pass"


def failed_gates(live: LiveRollout) -> str:
    """The failed gates and their figures, for the status and the log."""
    failed = [f"{gate}: {r.reason}" for gate, r in live.verdicts.items() if r.verdict == "fail"]
    return "; ".join(failed) or "a gate failed"
