"""The compute arbiter's figures, read into the metrics at scrape time."""

from __future__ import annotations

import time

from ensemble_ops.observability.metrics import Metrics
from ensemble_ops.serving.compute import ComputeArbiter

__all__ = ["ComputeReadings"]


class ComputeReadings:
    """The compute arbiter's figures at scrape time: the budget, each member's waits for
    threads since the last scrape, and the share of that time it held them."""

    def __init__(self, compute: ComputeArbiter, members: list[str]) -> None:
        self._compute = compute
        self._members = members
        self._last = time.monotonic()
        self._busy = dict.fromkeys(members, 0.0)

    def collect(self, metrics: Metrics) -> None:
        now = time.monotonic()
        elapsed, self._last = max(now - self._last, 1e-9), now
        metrics.compute_threads.set({}, self._compute.threads)
        for member in self._members:
            labels = {"model": member}
            for wait in self._compute.drain_waits(member):
                metrics.compute_wait.observe(labels, wait)
            busy = self._compute.busy_seconds(member)
            share = (busy - self._busy.get(member, 0.0)) / elapsed
            self._busy[member] = busy
            metrics.compute_busy.set(labels, min(max(share, 0.0), 1.0))
