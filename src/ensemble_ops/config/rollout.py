"""How a reload hands traffic to its new copy: the rollout, its gates, the reload limits."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from ensemble_ops.config.base import Section

__all__ = ["GATES", "GateSpec", "ReloadSettings", "RolloutKind", "RolloutSpec"]

RolloutKind = Literal["switch", "canary", "shadow", "blue_green"]
GATES = ("error_rate", "p95_latency", "ttft", "empty_share")
"""The gates a canary or shadow rollout judges, each new copy against old."""


class GateSpec(Section):
    """Limits the new copy must keep, each judged against the old copy over the same window."""

    max_error_rate: Annotated[float, Field(ge=0, le=1, strict=False)] = 0.05
    """At most this share of the new copy's requests may fail..."""
    max_error_rate_increase: Annotated[float, Field(ge=0, le=1, strict=False)] = 0.01
    """...and at most this much more than the old copy's share (1 point)."""
    max_p95_ratio: Annotated[float, Field(gt=0, strict=False)] = 1.5
    """The new copy's p95 latency over the old copy's."""
    max_ttft_ratio: Annotated[float, Field(gt=0, strict=False)] = 1.5
    """The new copy's p95 time to first token over the old copy's."""
    max_empty_share: Annotated[float, Field(ge=0, le=1, strict=False)] | None = None
    """The share of empty answers allowed; unset: the old copy's share + 5 points."""


class RolloutSpec(Section):
    """How a reload hands traffic to the new copy (``[reload.rollout]``, or the reload
    request's fields). ``switch``: all at once after warm-up; ``canary``: step by step while
    gates compare both copies; ``shadow``: mirror a share and judge the same gates, then go on
    to ``after_shadow``; ``blue_green``: keep both until promoted or aborted."""

    kind: RolloutKind = "switch"
    steps: Annotated[tuple[float, ...], Field(min_length=1, strict=False)] = (5.0, 25.0, 50.0)
    """The new copy's share of requests (percent) at each canary step, each under 100: the
    last step passing switches all traffic."""
    min_requests: Annotated[int, Field(ge=1)] = 20
    """Each step holds until the new copy answered at least this many requests..."""
    min_seconds: Annotated[float, Field(ge=0, strict=False)] = 30.0
    """...and for at least this long."""
    gates: GateSpec = GateSpec()
    failure_budget: Annotated[int, Field(ge=1)] = 2
    """Consecutive failed checks of a gate before the rollout rolls back."""
    deadline_s: Annotated[float, Field(gt=0, strict=False)] = 1800.0
    """A rollout still undecided after this long rolls back."""
    shadow_percent: Annotated[float, Field(gt=0, le=100, strict=False)] = 10.0
    """The share of requests mirrored to the new copy in a shadow rollout."""
    after_shadow: Literal["switch", "canary"] = "switch"
    """Where a shadow rollout whose gates pass goes next."""
    promote_timeout_s: Annotated[float, Field(gt=0, strict=False)] = 3600.0
    """A blue-green rollout not promoted within this long rolls back."""

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < step < 100 for step in steps):
            raise ValueError("each step must be a percentage in (0, 100); 100 is implied")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must increase")
        return steps


class ReloadSettings(Section):
    """Zero-downtime reload: warm-up, drain and safety limits."""

    model_dir: Annotated[Path, Field(strict=False)] | None = None
    """Reload paths must resolve inside it; unset: the folders of the configured models."""
    warmup_iterations: Annotated[int, Field(ge=1, le=100)] = 3
    warmup_prompt: str = "Hello, how are you?"
    warmup_max_tokens: Annotated[int, Field(gt=0)] = 8
    warmup_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """One warm-up inference that takes longer fails the reload."""
    drain_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """Past it a slow drain is reported; the old copy still closes only when idle."""
    max_concurrent_loads: Annotated[int, Field(ge=1)] = 1
    memory_headroom: Annotated[float, Field(ge=1.0)] = 1.1
    """A second copy needs its size times this in free RAM (or VRAM)."""
    rollout: RolloutSpec = RolloutSpec()
    """How reloads hand traffic to the new copy unless the request says otherwise."""
