"""Background tasks owned by one app (or one embedded setup), closed with it.

Streams, probes and reloads each start work that outlives the call that started it. They
share one ``TaskRunner``, passed to their constructors: it starts tasks on the running event
loop, logs any that fail, and on ``aclose()`` cancels what is left and waits for it. Written
by hand because anyio's task groups must be entered by the code that awaits them, while these
tasks start from plain method calls at any time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["TaskRunner"]

_log = logging.getLogger(__name__)


class TaskRunner:
    """Starts tasks that belong to no request; ``aclose`` ends them all."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``func(*args)`` as a task of the running loop (call from the loop)."""
        if self._closed:
            raise RuntimeError("the task runner is closed")
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(func(*args))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
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
            pending = list(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
