"""Background tasks owned by one app (or one embedded setup), closed with it.

Streams, probes and reloads each start work that outlives the call that started it. They
share one ``TaskRunner``, passed to their constructors: it starts tasks on the running event
loop, logs any that fail, and on ``aclose()`` cancels what is left and waits for it. Written
by hand because anyio's task groups must be entered by the code that awaits them, while these
tasks start from plain method calls at any time.

Each task runs in an anyio cancel scope, and ``aclose()`` cancels the scope, not the asyncio
task: work the tasks shield (``anyio.CancelScope(shield=True)``: a claim sent to Redis, a
copy being freed) then finishes before the cancellation reaches them. asyncio's own
``task.cancel()`` would go straight through such a shield.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

__all__ = ["TaskRunner"]

_log = logging.getLogger(__name__)


class TaskRunner:
    """Starts tasks that belong to no request; ``aclose`` ends them all."""

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[Any], anyio.CancelScope] = {}
        self._closed = False

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``func(*args)`` as a task of the running loop (call from the loop)."""
        if self._closed:
            raise RuntimeError("the task runner is closed")
        scope = anyio.CancelScope()
        task = asyncio.get_running_loop().create_task(_within(scope, func(*args)))
        self._tasks[task] = scope
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        del self._tasks[task]
        if not task.cancelled() and task.exception() is not None:
            _log.error("background task failed", exc_info=task.exception())

    @property
    def running(self) -> int:
        """Tasks not finished yet."""
        return len(self._tasks)

    async def aclose(self) -> None:
        """Cancel every task still running and wait until they have all ended."""
        self._closed = True
        while self._tasks:
            pending = list(self._tasks.items())
            for _, scope in pending:
                scope.cancel()
            await asyncio.gather(*(task for task, _ in pending), return_exceptions=True)


async def _within(scope: anyio.CancelScope, work: Coroutine[Any, Any, Any]) -> None:
    with scope:
        await work
