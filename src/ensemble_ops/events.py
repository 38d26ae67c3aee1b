"""In-process publish/subscribe on the event loop.

Components announce what happened (a model loaded, an inference finished); views such as
the log, health and metrics subscribe. Nothing reaches into another component's state, and
this module depends on nothing else in the package.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypeVar, get_args

__all__ = [
    "RELOAD_STATES",
    "ROLLING_STATES",
    "CacheBackendChanged",
    "CacheBackendFailed",
    "CacheLookedUp",
    "Copy",
    "DrainTimedOut",
    "EventBus",
    "GateJudged",
    "GateVerdict",
    "HealthChanged",
    "InferenceFailed",
    "InferenceFinished",
    "LimitsBackendChanged",
    "LoopLagMeasured",
    "ModelLoadFailed",
    "ModelLoaded",
    "ModelUnloaded",
    "ProbeFinished",
    "QualityJudged",
    "QualitySkipped",
    "RateLimited",
    "ReloadFinished",
    "ReloadOutcome",
    "ReloadProgressed",
    "ReloadState",
    "ReloadStateChanged",
    "RolloutFinished",
    "RolloutOutcome",
    "RolloutStepped",
    "ShadowFinished",
]

E = TypeVar("E")
Copy: TypeAlias = Literal["stable", "candidate"]
"""Which copy of a member answered: the one serving (stable), or a rollout's new copy."""
GateVerdict: TypeAlias = Literal["pass", "fail", "hold"]
ReloadState: TypeAlias = Literal[
    "idle",
    "warming_up",
    "ready",
    "shadowing",
    "canary",
    "awaiting_promotion",
    "switching",
    "completed",
    "failed",
    "rolled_back",
]
"""The reload machine's states (``reload/states.py`` declares its transitions)."""
RELOAD_STATES: tuple[str, ...] = get_args(ReloadState)
ROLLING_STATES = ("shadowing", "canary", "awaiting_promotion")
"""The states in which a rollout serves the new copy beside the old one."""
ReloadOutcome: TypeAlias = Literal["completed", "failed", "rolled_back"]
RolloutOutcome: TypeAlias = Literal["promoted", "rolled_back", "failed"]
_log = logging.getLogger(__name__)


class EventBus:
    """Synchronous fan-out: ``publish`` calls each subscriber of the event's type in turn.

    Call it from the event loop only (subscribers such as aioprometheus have no locks). A
    subscriber that raises is logged and skipped, so one broken view cannot break a request.
    """

    def __init__(self) -> None:
        self._handlers: defaultdict[type[Any], list[Callable[[Any], None]]] = defaultdict(list)

    def subscribe(self, event_type: type[E], handler: Callable[[E], None]) -> None:
        self._handlers[event_type].append(handler)

    def publish(self, event: object) -> None:
        for handler in self._handlers.get(type(event), ()):
            try:
                handler(event)
            except Exception:
                _log.exception("event handler failed for %s", type(event).__name__)


@dataclass(frozen=True)
class ModelLoaded:
    model: str
    generation: int
    weights_bytes: int
    context_bytes: int
    load_s: float
    gpu_bytes: int = 0


@dataclass(frozen=True)
class ModelLoadFailed:
    model: str
    error: str


@dataclass(frozen=True)
class ModelUnloaded:
    model: str
    generation: int


@dataclass(frozen=True)
class InferenceFinished:
    """A request was answered, from the engine or from the response cache."""

    model: str
    mode: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    stream: bool
    outcome: Literal["success", "cancelled"] = "success"
    time_to_first_token_s: float | None = None
    engine_s: float = 0.0
    """Time in the engine (0 for a cache hit); latency_s adds queueing and overhead."""
    queue_wait_s: float | None = None
    """Waiting for a sequence slot of the batching engine (None for a cache hit)."""
    time_per_output_token_s: float | None = None
    """Decode time per token after the first (None for a hit or fewer than two tokens)."""
    copy: Copy = "stable"
    cached_tokens: int = 0
    """Prompt tokens whose KV cells the engine reused (prefix reuse; 0 for a cache hit)."""
    compute_wait_s: float = 0.0
    """Time its decode steps waited for the machine's cores, held by other members' steps
    (or the other copy's): latency minus this is what the copy itself took."""
    first_token_compute_wait_s: float = 0.0
    """The part of that wait before the first token."""
    key: str = "anonymous"
    """The caller's API key name (``anonymous`` without keys, ``operator`` on the admin
    listener): a configured, bounded set, never the key itself."""


@dataclass(frozen=True)
class InferenceFailed:
    """An attempt failed on ``model`` (or routing found none: model "ensemble").

    ``final`` is False when another member then answered the request (a fallback), so each
    request ends in exactly one ``InferenceFinished`` or one final ``InferenceFailed``.
    """

    model: str
    mode: str
    error_type: str
    message: str
    latency_s: float
    final: bool = True
    copy: Copy = "stable"
    key: str = "anonymous"


@dataclass(frozen=True)
class ShadowFinished:
    """A mirrored request ended on a rollout's new copy; its answer was discarded. Counted in
    no user-facing metric: only the rollout's gates read it."""

    model: str
    latency_s: float
    time_to_first_token_s: float | None
    completion_tokens: int
    empty: bool
    error_type: str | None = None


@dataclass(frozen=True)
class RolloutStepped:
    """A rollout moved the share of a member's requests that its new copy answers."""

    model: str
    rollout: str
    weight_percent: float
    message: str


@dataclass(frozen=True)
class GateJudged:
    """One gate compared the new copy with the old one over the same window."""

    model: str
    gate: str
    verdict: GateVerdict
    candidate: float | None
    stable: float | None
    limit: float | None
    reason: str


@dataclass(frozen=True)
class QualityJudged:
    """A golden set ran on one copy of a member: the quality gate's new copy, or the serving
    copy it is compared with. ``failures`` are (case, input, expected, got)."""

    model: str
    copy: Copy
    golden_set: str
    cases: int
    passed: int
    seconds: float
    failures: tuple[tuple[str, str, str, str], ...] = ()

    @property
    def pass_ratio(self) -> float:
        return self.passed / self.cases if self.cases else 0.0


@dataclass(frozen=True)
class QualitySkipped:
    """A reload ran without the quality gate its member has, because its request said so."""

    model: str
    golden_set: str


@dataclass(frozen=True)
class RolloutFinished:
    """A rollout ended: the new copy took all traffic (promoted), or was rolled back."""

    model: str
    rollout: str
    outcome: RolloutOutcome
    reason: str | None = None


@dataclass(frozen=True)
class CacheBackendFailed:
    """One operation on a shared cache backend failed or timed out; the request went on
    without it."""

    backend: str
    operation: str
    error: str


@dataclass(frozen=True)
class CacheBackendChanged:
    """A shared cache backend became reachable again (``up``) or stopped being reachable."""

    backend: str
    up: bool
    reason: str | None = None


@dataclass(frozen=True)
class RateLimited:
    """A key's limit refused a request (429): ``limit`` is requests, tokens or parallel."""

    key: str
    limit: str


@dataclass(frozen=True)
class LimitsBackendChanged:
    """The shared store of the keys' limits became reachable again (``up``) or stopped being
    reachable (each replica then counts on its own)."""

    up: bool
    reason: str | None = None


@dataclass(frozen=True)
class CacheLookedUp:
    """A deterministic request looked up the response cache."""

    model: str
    hit: bool


@dataclass(frozen=True)
class ProbeFinished:
    """A health probe's one-token inference ended (``ok`` False: failed or timed out)."""

    model: str
    ok: bool
    latency_s: float
    error: str | None = None


@dataclass(frozen=True)
class ReloadStateChanged:
    """A member's reload machine moved from one state to another."""

    model: str
    from_state: str
    to_state: str
    progress_percent: float
    message: str
    elapsed_s: float


@dataclass(frozen=True)
class ReloadProgressed:
    """Progress within a reload state (load done, warm-up iteration i of n)."""

    model: str
    state: str
    progress_percent: float
    message: str


@dataclass(frozen=True)
class ReloadFinished:
    model: str
    outcome: ReloadOutcome
    duration_s: float
    error: str | None = None


@dataclass(frozen=True)
class DrainTimedOut:
    """An old copy still had requests in flight after reload.drain_timeout_s."""

    model: str
    generation: int
    in_flight: int


@dataclass(frozen=True)
class LoopLagMeasured:
    """The watchdog's latest event-loop lag sample."""

    lag_s: float


@dataclass(frozen=True)
class HealthChanged:
    """A member's health status changed."""

    model: str
    old: str
    new: str
    reason: str
