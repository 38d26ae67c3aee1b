"""A member's reload status: its fields are exactly the JSON of the reload routes."""

from __future__ import annotations

from dataclasses import dataclass

from ensemble_ops.events import ROLLING_STATES
from ensemble_ops.reload.gates import CopyFigures, GateResult

__all__ = ["RUNNING", "ReloadStatus", "RolloutStatus"]

RUNNING = frozenset({"warming_up", "ready", *ROLLING_STATES, "switching"})
"""The states of a reload in progress."""


@dataclass(frozen=True)
class RolloutStatus:
    """A rollout's live picture: where traffic goes, what each copy did, what the gates say."""

    kind: str
    weight_percent: float
    """The share of requests the new copy answers now."""
    shadow_percent: float
    """The share mirrored to it (answers discarded)."""
    step: str | None
    """The canary step, ``2/3``; None outside a canary."""
    copies: dict[str, CopyFigures]
    """``stable`` and ``candidate``, over the current window."""
    gates: dict[str, GateResult]
    """Each gate's latest verdict."""
    failed_checks: int
    """Consecutive checks with a failed gate (the failure budget counts these)."""
    awaiting: str | None
    """What it waits for: ``promote`` (blue-green), else None."""


@dataclass(frozen=True)
class ReloadStatus:
    """What ``GET /health/llm/reload/{model}`` returns."""

    model: str
    state: str
    progress_percent: float
    message: str
    started_at: str | None
    completed_at: str | None
    error: str | None
    rollout: RolloutStatus | None = None

    @property
    def running(self) -> bool:
        return self.state in RUNNING
