"""The event stream as a view: the bus's events as numbered records for ``GET /events``.

Each event becomes a ``FeedEvent``: an id (increasing), its type (the log's event name:
``reload.state_changed``, ``health.changed``, ``request``...), the member, a timestamp and
its fields. Requests become one ``request`` summary each (member, mode, copy, status,
latency, tokens, cache): never a prompt or an answer. Text fields that could carry a file
path (errors, messages) keep the file name only, so the public stream shows no paths.

The feed keeps the last 1,000 records (a client resumes with ``Last-Event-ID``) and hands
each to every follower's own queue without waiting: a follower 1,000 records behind is
dropped (``llm_event_clients_dropped_total``), never the bus slowed. ``close`` ends every
follower at once (SIGTERM: open streams never hold the shutdown).

Written by hand: the bus is synchronous on the event loop and each follower needs only a
bounded deque and a wake-up, which no broadcast library gives with a drop-the-slow rule.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio

from ensemble_ops.events import (
    CacheBackendChanged,
    EventBus,
    GateJudged,
    HealthChanged,
    InferenceFailed,
    InferenceFinished,
    ModelLoaded,
    ModelLoadFailed,
    ModelUnloaded,
    QualityJudged,
    ReloadFinished,
    ReloadProgressed,
    ReloadStateChanged,
    RolloutFinished,
    RolloutStepped,
)

__all__ = ["EVENT_TYPES", "RING_SIZE", "EventFeed", "FeedEvent", "Follower"]

RING_SIZE = 1000
"""Records kept for resuming, and how far behind a follower may fall before it is dropped."""
PACE_S = 0.05
"""A follower gets at most one batch this often."""
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\\/\s'\"(),:]+)+[\\/]([^\\/\s'\"(),:]+)")


@dataclass(frozen=True)
class FeedEvent:
    """One record of the stream."""

    id: int
    type: str
    model: str | None
    ts: float
    """Unix time it happened, in seconds."""
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "model": self.model, "ts": self.ts, **self.data}


def file_names_only(text: str | None) -> str | None:
    """``text`` with every absolute path cut to its file name."""
    return None if text is None else _PATH.sub(r"\1", text)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _request(event: InferenceFinished | InferenceFailed) -> dict[str, Any]:
    if isinstance(event, InferenceFinished):
        return {
            "mode": event.mode,
            "copy": event.copy,
            "status": event.outcome,
            "latency_ms": _ms(event.latency_s),
            "prompt_tokens": event.prompt_tokens,
            "completion_tokens": event.completion_tokens,
            "cached": event.cached,
            "stream": event.stream,
            "key": event.key,
        }
    return {
        "mode": event.mode,
        "copy": event.copy,
        "status": event.error_type,
        "latency_ms": _ms(event.latency_s),
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached": False,
        "stream": None,
        "key": event.key,
    }


# Each event kind: its type name and its fields (what the log says, without paths).
_VIEWS: dict[type[Any], tuple[str, Callable[[Any], dict[str, Any]]]] = {
    ModelLoaded: (
        "model.loaded",
        lambda e: {
            "generation": e.generation,
            "weights_mb": round(e.weights_bytes / 2**20, 1),
            "context_mb": round(e.context_bytes / 2**20, 1),
            "load_s": round(e.load_s, 3),
        },
    ),
    ModelUnloaded: ("model.unloaded", lambda e: {"generation": e.generation}),
    ModelLoadFailed: ("model.load_failed", lambda e: {"error": file_names_only(e.error)}),
    HealthChanged: (
        "health.changed",
        lambda e: {"old": e.old, "new": e.new, "reason": file_names_only(e.reason)},
    ),
    ReloadStateChanged: (
        "reload.state_changed",
        lambda e: {
            "from": e.from_state,
            "to": e.to_state,
            "progress": e.progress_percent,
            "message": file_names_only(e.message),
            "elapsed_s": round(e.elapsed_s, 3),
        },
    ),
    ReloadProgressed: (
        "reload.progress",
        lambda e: {
            "state": e.state,
            "progress": e.progress_percent,
            "message": file_names_only(e.message),
        },
    ),
    ReloadFinished: (
        "reload.finished",
        lambda e: {
            "outcome": e.outcome,
            "elapsed_s": round(e.duration_s, 3),
            "error": file_names_only(e.error),
        },
    ),
    RolloutStepped: (
        "rollout.stepped",
        lambda e: {"rollout": e.rollout, "weight_percent": e.weight_percent, "message": e.message},
    ),
    GateJudged: (
        "rollout.gate",
        lambda e: {
            "gate": e.gate,
            "verdict": e.verdict,
            "candidate": e.candidate,
            "stable": e.stable,
            "limit": e.limit,
            "reason": e.reason,
        },
    ),
    RolloutFinished: (
        "rollout.finished",
        lambda e: {"rollout": e.rollout, "outcome": e.outcome, "reason": e.reason},
    ),
    QualityJudged: (
        "quality.judged",
        lambda e: {
            "copy": e.copy,
            "golden_set": e.golden_set,
            "passed": e.passed,
            "cases": e.cases,
            "pass_ratio": round(e.pass_ratio, 4),
        },
    ),
    CacheBackendChanged: (
        "cache.backend_changed",
        lambda e: {"backend": e.backend, "up": e.up, "reason": file_names_only(e.reason)},
    ),
    InferenceFinished: ("request", _request),
    InferenceFailed: ("request", _request),
}
EVENT_TYPES: tuple[str, ...] = tuple(dict.fromkeys(name for name, _ in _VIEWS.values()))
"""The types a client may filter on (``?type=``)."""


@dataclass(eq=False)  # each follower is itself: a set member by identity
class Follower:
    """One client's queue: records it has not read yet, and its filters."""

    models: frozenset[str]
    types: frozenset[str]
    pending: deque[FeedEvent] = field(default_factory=deque)
    woken: anyio.Event = field(default_factory=anyio.Event)
    ended: str | None = None
    """Why the stream ends: ``dropped`` (too far behind) or ``closing``; None while open."""
    _delivered: float = float("-inf")

    def wants(self, event: FeedEvent) -> bool:
        return (not self.types or event.type in self.types) and (
            not self.models or event.model in self.models
        )

    def offer(self, event: FeedEvent) -> bool:
        """Queue ``event``; False when the follower is too far behind to keep."""
        if self.wants(event):
            if len(self.pending) >= RING_SIZE:
                return False
            self.pending.append(event)
            self.woken.set()
        return True

    def end(self, why: str) -> None:
        self.ended = why
        self.woken.set()

    async def next_batch(self, timeout_s: float, pace_s: float = PACE_S) -> list[FeedEvent]:
        """What arrived (waiting up to ``timeout_s`` for something); [] on a timeout.

        At most one batch per ``pace_s``: the first event after a quiet spell goes at once,
        and a burst comes in batches, so a busy service wakes each follower 20 times a
        second at most, not once per request.
        """
        if not self.pending and self.ended is None:
            with anyio.move_on_after(timeout_s):
                await self.woken.wait()
        gap = pace_s - (time.monotonic() - self._delivered)
        if gap > 0 and self.pending and self.ended is None:
            await anyio.sleep(gap)
        self.woken = anyio.Event()
        batch = list(self.pending)
        self.pending.clear()
        if batch:
            self._delivered = time.monotonic()
        return batch


class EventFeed:
    """The bus's events, numbered, kept and fanned out to followers."""

    def __init__(
        self,
        bus: EventBus,
        on_drop: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ring: deque[FeedEvent] = deque(maxlen=RING_SIZE)
        self._ids = itertools.count(1)
        self._followers: set[Follower] = set()
        self._on_drop = on_drop
        self._clock = clock
        self.closed = False
        for kind in _VIEWS:
            bus.subscribe(kind, self._publish)

    @property
    def last_id(self) -> int:
        """The id of the newest record (0 before the first): a page's snapshot says where
        its stream should resume."""
        return self._ring[-1].id if self._ring else 0

    @property
    def followers(self) -> int:
        return len(self._followers)

    def recent(self, type_: str, limit: int) -> list[FeedEvent]:
        """The last ``limit`` records of ``type_`` still kept, oldest first."""
        return [e for e in self._ring if e.type == type_][-limit:]

    def follow(
        self, models: Iterable[str] = (), types: Iterable[str] = (), after: int | None = None
    ) -> Follower:
        """A new follower; with ``after`` (a Last-Event-ID) it first gets the kept records
        that came after that one."""
        follower = Follower(frozenset(models), frozenset(types))
        if self.closed:
            follower.end("closing")
            return follower
        if after is not None:
            for event in self._ring:
                if event.id > after:
                    follower.offer(event)
        self._followers.add(follower)
        return follower

    def leave(self, follower: Follower) -> None:
        self._followers.discard(follower)

    def close(self) -> None:
        """End every stream now and refuse new ones (shutdown)."""
        self.closed = True
        for follower in list(self._followers):
            follower.end("closing")
        self._followers.clear()

    def _publish(self, event: Any) -> None:
        if isinstance(event, InferenceFailed) and not event.final:
            return  # another member answered: the request's one record is that answer
        name, view = _VIEWS[type(event)]
        record = FeedEvent(
            next(self._ids), name, getattr(event, "model", None), self._clock(), view(event)
        )
        self._ring.append(record)
        for follower in list(self._followers):
            if not follower.offer(record):
                self._followers.discard(follower)
                follower.end("dropped")
                self._on_drop()
