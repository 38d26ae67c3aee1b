"""The records health answers with: their fields are exactly the JSON of the health routes.

The HTTP layer serialises these dataclasses as they are (pydantic ``TypeAdapter``) and builds
the OpenAPI schema from them, so a field added here shows up in both at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["HealthStatus", "ModelHealth", "ProbeResult", "ReloadProgress", "utc_now"]


class HealthStatus(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"

    @property
    def serving(self) -> bool:
        """Healthy and degraded members serve; the others do not."""
        return self in (HealthStatus.HEALTHY, HealthStatus.DEGRADED)


@dataclass(frozen=True)
class ProbeResult:
    """What ``run_inference=true`` found: ran now, came from the probe cache, or skipped."""

    outcome: str
    """ok, failed, timeout, busy (the member serves requests: not queued behind them) or
    not_loaded."""
    latency_ms: float | None
    cached: bool
    error: str | None = None


@dataclass(frozen=True)
class ReloadProgress:
    """The member's reload, in brief (the full status is at /health/llm/reload/{model})."""

    state: str
    progress_percent: float


@dataclass(frozen=True)
class ModelHealth:
    """One member's health, as ``GET /health/llm`` returns it.

    ``probe`` and ``reload`` are left out of the JSON when None (the only fields with a
    default: the serialiser drops fields equal to their default).
    """

    model_name: str
    status: HealthStatus
    loaded: bool
    inference_ready: bool
    last_inference_ms: float | None
    memory_mb: float | None
    gpu_memory_mb: float | None
    error_message: str | None
    checked_at: str
    uptime_seconds: float | None
    probe: ProbeResult | None = None
    reload: ReloadProgress | None = None


def utc_now() -> str:
    """ISO-8601 UTC with a ``Z``, as every ``checked_at``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
