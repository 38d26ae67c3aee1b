"""The last minutes of answers, in memory: the status page's sparklines and rates.

Per member, answers are counted in ``bucket_s`` buckets over the last ``buckets`` of them:
generated tokens (tokens/s) and latencies (p95). The page needs no Prometheus for these;
the metrics are the long-term record. A view of the event stream, like the others.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ensemble_ops.events import EventBus, InferenceFailed, InferenceFinished

__all__ = ["RecentFigures"]


@dataclass
class _Bucket:
    index: int
    tokens: int = 0
    requests: int = 0
    hits: int = 0
    latencies: list[float] = field(default_factory=list)

    def p95(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class RecentFigures:
    """Answers of the last ``bucket_s * buckets`` seconds, per member, in buckets."""

    def __init__(
        self,
        bus: EventBus,
        members: list[str],
        *,
        bucket_s: float = 10.0,
        buckets: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bucket_s = bucket_s
        self._buckets = buckets
        self._clock = clock
        self._members: dict[str, deque[_Bucket]] = {m: deque(maxlen=buckets) for m in members}
        bus.subscribe(InferenceFinished, self._finished)
        bus.subscribe(InferenceFailed, self._failed)

    def _bucket(self, member: str) -> _Bucket | None:
        kept = self._members.get(member)
        if kept is None:
            return None  # "ensemble": routing found no member
        index = int(self._clock() // self.bucket_s)
        if not kept or kept[-1].index != index:
            kept.append(_Bucket(index))
        return kept[-1]

    def _finished(self, event: InferenceFinished) -> None:
        bucket = self._bucket(event.model)
        if bucket is not None:
            bucket.requests += 1
            bucket.hits += event.cached
            bucket.tokens += event.completion_tokens
            bucket.latencies.append(event.latency_s)

    def _failed(self, event: InferenceFailed) -> None:
        bucket = self._bucket(event.model) if event.final else None
        if bucket is not None:
            bucket.requests += 1

    def series(self, member: str) -> dict[str, list[float | None]]:
        """Oldest first, one value per bucket up to now: tokens/s (0 without answers) and
        p95 latency in seconds (None without answers)."""
        now = int(self._clock() // self.bucket_s)
        kept = {bucket.index: bucket for bucket in self._members.get(member, ())}
        indexes = range(now - self._buckets + 1, now + 1)
        return {
            "tokens_per_s": [
                round(kept[i].tokens / self.bucket_s, 2) if i in kept else 0.0 for i in indexes
            ],
            "p95_latency_s": [kept[i].p95() if i in kept else None for i in indexes],
        }

    def requests_per_s(self, window_s: float = 60.0) -> float:
        """Answers (and final failures) per second over the last ``window_s``."""
        since = int((self._clock() - window_s) // self.bucket_s)
        count = sum(
            bucket.requests
            for kept in self._members.values()
            for bucket in kept
            if bucket.index > since
        )
        return round(count / window_s, 3)

    def hit_share(self) -> float | None:
        """Answers from the response cache, as a share of all answers kept (None: none)."""
        requests = sum(b.requests for kept in self._members.values() for b in kept)
        hits = sum(b.hits for kept in self._members.values() for b in kept)
        return round(hits / requests, 4) if requests else None
