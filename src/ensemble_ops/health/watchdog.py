"""The liveness watchdog: is this process stuck?

Three signs, each with a limit in ``[health]``:

- event-loop lag: a task sleeps ``watchdog_interval_s`` and measures how late it wakes up.
  Lag over ``loop_lag_limit_s`` within the last ``loop_lag_window_s`` fails liveness. (While
  the loop is *completely* blocked nothing can answer, the liveness probe included: the
  probe then times out, which Kubernetes counts as a failure too; see docs/operations.md.)
- an inference running longer than ``inference_hard_limit_s``: a stuck worker thread;
- a lease held longer than ``lease_hard_limit_s``: a request that never lets go of a model
  (a deadlock), queued or running.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

import anyio

from ensemble_ops.config import HealthSettings
from ensemble_ops.events import EventBus, LoopLagMeasured
from ensemble_ops.serving.slot import Loaded

__all__ = ["Watchdog"]


class Watchdog:
    def __init__(
        self,
        settings: HealthSettings,
        instances: Callable[[], Iterable[Loaded]],
        bus: EventBus | None = None,
    ) -> None:
        self._settings = settings
        self._instances = instances
        self._bus = bus
        self._lags: deque[tuple[float, float]] = deque()
        self.last_lag_s = 0.0

    async def run(self) -> None:
        """Measure event-loop lag forever (run it in the app's task group)."""
        interval = self._settings.watchdog_interval_s
        while True:
            before = time.monotonic()
            await anyio.sleep(interval)
            now = time.monotonic()
            self.record_lag(now, max(0.0, now - before - interval))

    def record_lag(self, now: float, lag_s: float) -> None:
        self.last_lag_s = lag_s
        self._lags.append((now, lag_s))
        horizon = now - self._settings.loop_lag_window_s
        while self._lags and self._lags[0][0] < horizon:
            self._lags.popleft()
        if self._bus is not None:
            self._bus.publish(LoopLagMeasured(lag_s))

    def verdict(self) -> str | None:
        """Why the process looks stuck, or None when it does not."""
        settings, now = self._settings, time.monotonic()
        worst = max(
            (lag for at, lag in self._lags if at >= now - settings.loop_lag_window_s), default=0.0
        )
        if worst > settings.loop_lag_limit_s:
            return (
                f"event loop lagged {worst:.1f} s in the last {settings.loop_lag_window_s:g} s "
                f"(limit {settings.loop_lag_limit_s:g} s)"
            )
        for loaded in self._instances():
            step = loaded.engine.step_started
            if step is not None and now - step > settings.inference_hard_limit_s:
                return (
                    f"a decode step of {loaded.name} has run for {now - step:.0f} s "
                    f"(limit {settings.inference_hard_limit_s:g} s)"
                )
            running_since = loaded.running_since
            if running_since is not None and now - running_since > settings.inference_hard_limit_s:
                return (
                    f"an inference on {loaded.name} has run for {now - running_since:.0f} s "
                    f"(limit {settings.inference_hard_limit_s:g} s)"
                )
            held = loaded.oldest_lease_s(now)
            if held > settings.lease_hard_limit_s:
                return (
                    f"a request has held {loaded.name} for {held:.0f} s "
                    f"(limit {settings.lease_hard_limit_s:g} s)"
                )
        return None
