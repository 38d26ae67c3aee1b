"""One machine's cores, shared by every member's decode steps by the earliest deadline.

ggml's worker threads spin at a barrier between operations, so more busy threads than
cores is a cliff, not a slope (llama.cpp PR #13079: 0.12 against 10.13 tokens/s). The
``ComputeArbiter`` holds the process's budget of threads (the cores it may use) and grants
each ``llama_decode`` of every member, warm-ups and probes included, its threads: the
earliest deadline among the waiting steps goes first, so a ``fast`` step of one member goes
before a ``creative`` step of another, and the busy threads never exceed the budget.

A member alone takes every thread (up to its cap, ``n_threads``); members active together
(a step in the last ``share_hold_s``) split the budget and decode side by side, and steps
that find no free thread wait, earliest deadline first. Chosen by measurement on two cores
with the default ensemble (docs/performance.md): splitting made 1.29x the tokens per second
of either member alone where taking turns with all the threads made 0.99x (one thread per
model wastes nothing at ggml's barriers), and a fast request on one member waited for no
step of the other (p95 time to first token 1.5-1.65x alone, against 1.75x when taking
turns, which must wait for the other's step in flight). Written by hand: Triton's rate
limiter is the nearest anchor, and nothing on PyPI shares threads between C libraries.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CGROUP_CPU_MAX", "ComputeArbiter", "available_cores"]

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2's CPU quota of this process's group: ``max 100000`` (none) or ``200000 100000``
(2 CPUs)."""


def available_cores(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, capped by the cgroup v2 quota
    (rounded down, at least 1). Ollama counts the machine's cores and oversubscribes a
    container (ollama#10814)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return max(cores, 1)
    if quota != "max":
        with suppress(ValueError, ZeroDivisionError):  # an unreadable quota limits nothing
            cores = min(cores, math.floor(int(quota) / int(period)))
    return max(cores, 1)


@dataclass(order=True)
class _Waiter:
    deadline: float
    order: int
    cap: int = field(compare=False)
    granted: int = field(default=0, compare=False)


class ComputeArbiter:
    """Grants threads to decode steps, earliest deadline first, within a budget.

    Thread-safe: every member's scheduler thread calls :meth:`grant` around its
    ``llama_decode``. Waits and busy time are kept per member for the metrics.
    """

    def __init__(self, threads: int, *, share_hold_s: float = 1.0) -> None:
        """``share_hold_s``: how long after its last step a member still counts as active,
        keeping its share of the threads for its next request."""
        if threads < 1:
            raise ValueError(f"a compute budget needs at least one thread, not {threads}")
        self.threads = threads
        self._share_hold_s = share_hold_s
        self._active_at: dict[str, float] = {}
        self._used = 0
        self._waiting: list[_Waiter] = []
        self._order = itertools.count()
        self._lock = threading.Condition()
        self._busy_s: defaultdict[str, float] = defaultdict(float)
        self._waits: defaultdict[str, deque[float]] = defaultdict(lambda: deque(maxlen=4096))

    @contextmanager
    def grant(self, member: str, deadline: float, cap: int | None = None) -> Iterator[int]:
        """Wait for threads (blocking), then hold them for the block: as many as are free,
        up to ``cap`` (default: the whole budget). Yields how many were granted."""
        asked = time.monotonic()
        want = self.threads if cap is None else max(1, min(cap, self.threads))
        waiter = _Waiter(deadline, next(self._order), want)
        with self._lock:
            self._active_at[member] = asked
            heapq.heappush(self._waiting, waiter)
            while not (self._waiting[0] is waiter and self._used < self.threads):
                self._lock.wait()
            heapq.heappop(self._waiting)
            waiter.granted = min(want, self.threads - self._used, self._share(asked))
            self._used += waiter.granted
            if self._waiting and self._used < self.threads:
                self._lock.notify_all()  # threads are left: the next waiter may take them
        started = time.monotonic()
        self._waits[member].append(started - asked)
        try:
            yield waiter.granted
        finally:
            ended = time.monotonic()
            with self._lock:
                self._used -= waiter.granted
                self._busy_s[member] += ended - started
                self._active_at[member] = ended
                self._lock.notify_all()

    def _share(self, now: float) -> int:
        """A step's most threads: the budget split among the members active in the last
        ``share_hold_s`` (under the lock)."""
        active = sum(now - at < self._share_hold_s for at in self._active_at.values())
        return max(1, self.threads // max(1, active))

    @property
    def in_use(self) -> int:
        """Threads granted right now."""
        with self._lock:
            return self._used

    @property
    def waiting(self) -> int:
        """Steps waiting for threads right now."""
        with self._lock:
            return len(self._waiting)

    def busy_seconds(self, member: str) -> float:
        """Seconds ``member`` has held grants, in all (a counter)."""
        with self._lock:
            return self._busy_s[member]

    def drain_waits(self, member: str) -> list[float]:
        """The waits for a grant since the last call, in seconds (for a histogram)."""
        waits = self._waits[member]
        return [waits.popleft() for _ in range(len(waits))]
