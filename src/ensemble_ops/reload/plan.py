"""What one reload does (its ``Plan``), and what a reload job needs from the manager that
runs it (its ``Host``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from opentelemetry.trace import Tracer

from ensemble_ops.config import ModelSpec, ReloadSettings, RolloutSpec
from ensemble_ops.events import EventBus
from ensemble_ops.quality.gate import QualityGate, QualityPlan
from ensemble_ops.reload.warmup import WarmupFunc
from ensemble_ops.serving.engine import Engine
from ensemble_ops.serving.slot import Loaded, ModelSlot
from ensemble_ops.tasks import TaskRunner

__all__ = ["Host", "LoaderFunc", "Plan", "ReloadFailedError", "keeps_capabilities"]

LoaderFunc = Callable[[], Engine]
"""Loads the new copy (blocking; runs in a worker thread)."""


class ReloadFailedError(Exception):
    """Why a reload failed; its message becomes the status's ``error``."""


@dataclass(frozen=True)
class Plan:
    """What one reload does: the spec it ends with, how it loads and warms the copy."""

    spec: ModelSpec
    loader: LoaderFunc
    warmup: WarmupFunc
    iterations: int
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    identify: Callable[[], str | None] = lambda: None
    """The new copy's cache identity (blocking: it may hash the file)."""
    allow_capability_change: bool = False
    """Let the new copy lack something the member's copy can do (chat, without a template)."""
    quality: QualityPlan | None = None
    """The golden set the new copy must pass before it takes traffic (None: no gate)."""


class Host(Protocol):
    """What a job needs from the manager that runs it."""

    bus: EventBus
    settings: ReloadSettings
    runner: TaskRunner
    load_limiter: anyio.CapacityLimiter
    tracer: Tracer
    quality_gate: QualityGate

    def available_memory(self, spec: ModelSpec) -> tuple[int, str]: ...

    async def retire(self, old: Loaded, *, wait: bool) -> bool: ...

    async def restore(self, slot: ModelSlot, spec: ModelSpec) -> None: ...


def keeps_capabilities(name: str, active: Loaded | None, engine: Engine, allowed: bool) -> None:
    """Capabilities belong to the copy: a new one that cannot do what the member's copy
    can (a chat member given a file without a chat template) would leave routing with a
    member that can chat on one copy only. Refused unless the reload allows it."""
    if active is None or allowed:
        return
    lost = sorted(active.engine.info.capabilities - engine.info.capabilities)
    if lost:
        raise ReloadFailedError(
            f"the new copy cannot do what {name!r} does now: {', '.join(lost)} "
            "(a chat needs a chat template: set the member's chat_template, or reload "
            "with allow_capability_change: true)"
        )
