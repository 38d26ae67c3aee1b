"""A member's reload status: its fields are exactly the JSON of the reload routes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from ensemble_ops.events import ROLLING_STATES
from ensemble_ops.quality.gate import QualityStatus
from ensemble_ops.reload.gates import CopyFigures, GateResult

__all__ = ["RUNNING", "ReloadStatus", "RolloutStatus", "iso_time"]

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
    quality: QualityStatus | None = None
    """The quality gate's verdict on the new copy (None: no golden set, or not run yet)."""

    @property
    def running(self) -> bool:
        return self.state in RUNNING


def iso_time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
