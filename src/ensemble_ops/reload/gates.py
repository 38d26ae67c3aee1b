"""The gates of a rollout: the new copy against the old one, over the same window.

Both copies serve from the same traffic at the same time (a canary splits it by weight, a
shadow mirrors it), so their figures are comparable without a baseline from another day.
Too little data is a ``hold``, never a pass: a rollout only moves on evidence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ensemble_ops.config import GATES, GateSpec
from ensemble_ops.events import Copy, GateVerdict

__all__ = ["CopyFigures", "GateResult", "Window", "judge"]

EMPTY_MARGIN = 0.05
"""Without ``max_empty_share``: the new copy may answer empty 5 points more often."""


@dataclass
class _Samples:
    """One copy's answers in the window."""

    requests: int = 0
    errors: int = 0
    empty: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    def p95(self, values: list[float]) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]

    def figures(self) -> CopyFigures:
        return CopyFigures(
            requests=self.requests,
            errors=self.errors,
            error_rate=self.errors / self.requests if self.requests else None,
            empty_share=self.empty / self.requests if self.requests else None,
            p95_latency_s=self.p95(self.latencies),
            p95_ttft_s=self.p95(self.ttfts),
        )


@dataclass(frozen=True)
class CopyFigures:
    """What one copy did in the current window (the reload status shows it)."""

    requests: int
    errors: int
    error_rate: float | None
    empty_share: float | None
    p95_latency_s: float | None
    p95_ttft_s: float | None


@dataclass(frozen=True)
class GateResult:
    """One gate's latest verdict, with the figures it compared."""

    verdict: GateVerdict
    candidate: float | None
    stable: float | None
    limit: float | None
    reason: str


class Window:
    """Answers of both copies since the window opened (each step opens a new one)."""

    def __init__(self) -> None:
        self.opened = time.monotonic()
        self._copies = {"stable": _Samples(), "candidate": _Samples()}

    def answered(self, copy: Copy, latency_s: float, ttft_s: float | None, empty: bool) -> None:
        samples = self._copies[copy]
        samples.requests += 1
        samples.empty += empty
        samples.latencies.append(latency_s)
        if ttft_s is not None:
            samples.ttfts.append(ttft_s)

    def failed(self, copy: Copy) -> None:
        samples = self._copies[copy]
        samples.requests += 1
        samples.errors += 1

    def figures(self, copy: Copy) -> CopyFigures:
        return self._copies[copy].figures()

    @property
    def age_s(self) -> float:
        return time.monotonic() - self.opened


def judge(window: Window, gates: GateSpec, min_requests: int) -> dict[str, GateResult]:
    """Every gate's verdict on ``window``: hold while either copy has too few answers."""
    new, old = window.figures("candidate"), window.figures("stable")
    if new.requests < min_requests or old.requests < 1:
        reason = (
            f"too little data: {new.requests}/{min_requests} answers from the new copy, "
            f"{old.requests} from the old"
        )
        return {gate: GateResult("hold", None, None, None, reason) for gate in GATES}
    return {
        "error_rate": _error_rate(new, old, gates),
        "p95_latency": _ratio(
            new.p95_latency_s, old.p95_latency_s, gates.max_p95_ratio, "p95 latency"
        ),
        "ttft": _ratio(new.p95_ttft_s, old.p95_ttft_s, gates.max_ttft_ratio, "p95 TTFT"),
        "empty_share": _empty_share(new, old, gates),
    }


def _error_rate(new: CopyFigures, old: CopyFigures, gates: GateSpec) -> GateResult:
    rate, before = new.error_rate or 0.0, old.error_rate or 0.0
    # Both bounds hold: 5% at most, and at most 1 point above the old copy.
    limit = min(gates.max_error_rate, before + gates.max_error_rate_increase)
    verdict: GateVerdict = "fail" if rate > limit else "pass"
    return GateResult(
        verdict,
        rate,
        before,
        limit,
        f"error rate {rate:.1%} against {before:.1%} (limit {limit:.1%})",
    )


def _ratio(new: float | None, old: float | None, ratio: float, what: str) -> GateResult:
    if new is None or old is None:
        return GateResult("hold", new, old, None, f"no {what} measured yet")
    limit = old * ratio
    verdict: GateVerdict = "fail" if new > limit else "pass"
    return GateResult(
        verdict,
        new,
        old,
        limit,
        f"{what} {new * 1000:.0f} ms against {old * 1000:.0f} ms (limit x{ratio:g})",
    )


def _empty_share(new: CopyFigures, old: CopyFigures, gates: GateSpec) -> GateResult:
    share, before = new.empty_share or 0.0, old.empty_share or 0.0
    limit = gates.max_empty_share if gates.max_empty_share is not None else before + EMPTY_MARGIN
    verdict: GateVerdict = "fail" if share > limit else "pass"
    return GateResult(
        verdict,
        share,
        before,
        limit,
        f"empty answers {share:.1%} against {before:.1%} (limit {limit:.1%})",
    )
