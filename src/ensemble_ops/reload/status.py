"""A member's reload status: its fields are exactly the JSON of the reload routes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RUNNING", "ReloadStatus"]

RUNNING = frozenset({"warming_up", "ready", "switching"})
"""The states of a reload in progress."""


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

    @property
    def running(self) -> bool:
        return self.state in RUNNING
