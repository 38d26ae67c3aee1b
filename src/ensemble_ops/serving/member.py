"""Running on a member: the request in the engine's terms, handed to the leased copy's
scheduler, its pieces carried back onto the event loop.

No thread waits per request: the scheduler's thread feeds a sink that hops each piece (and
the end) onto the loop with ``call_soon_threadsafe``. Tokenizing and rendering the chat run
on the loop for a short request and in a worker thread for a long one: a thread hop costs
more than tokenizing a short prompt (measured: 3 ms of a 7 ms demo-tiny answer went to the
hop, as the worker waits for the GIL), while a long prompt would hold the loop.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import anyio.to_thread

from ensemble_ops.errors import DeadlineUnreachableError, EngineError
from ensemble_ops.serving.engine import Completion, EngineFailure
from ensemble_ops.serving.inference import ClientGoneError, InferenceRequest, TextStream, prepare
from ensemble_ops.serving.slot import Lease

__all__ = ["INLINE_CHARS", "Progress", "run_on"]

INLINE_CHARS = 8192
"""Requests up to this many characters are tokenized on the event loop (up to about 4 ms)."""


class Progress(Protocol):
    """What running reports along the way (an ``Attempt``; a mirror reports nothing)."""

    def running(self) -> None: ...

    def first_piece(self) -> None: ...


class _LoopSink:
    """A sequence's output, carried from the engine's thread onto the event loop."""

    def __init__(self, stream: TextStream, progress: Progress) -> None:
        self._loop = asyncio.get_running_loop()
        self._stream = stream
        self._progress = progress
        self.done: asyncio.Future[Completion | EngineFailure] = self._loop.create_future()

    def piece(self, text: str) -> None:  # the engine's thread
        self._loop.call_soon_threadsafe(self._piece, text)

    def end(self, outcome: Completion | EngineFailure) -> None:  # the engine's thread
        self._loop.call_soon_threadsafe(self._end, outcome)

    def _piece(self, text: str) -> None:
        self._progress.first_piece()
        self._stream.deliver(text)

    def _end(self, outcome: Completion | EngineFailure) -> None:
        if not self.done.done():
            self.done.set_result(outcome)


async def run_on(
    lease: Lease, stream: TextStream, progress: Progress, *, target_s: float
) -> Completion:
    """Generate ``stream``'s request on the leased copy; pieces go to ``stream`` as they
    come (when it is incremental). Raises what the engine refuses (a 400: the prompt is too
    long, a chat the template refuses), ``DeadlineUnreachableError`` when the request could
    not start within ``target_s`` (its latency target), ``EngineError`` when the engine fails
    the sequence, and ``ClientGoneError`` when the client left first (it is cancelled)."""
    loaded = lease.loaded
    engine = loaded.engine
    request = stream.request
    if _size(request) <= INLINE_CHARS:
        prepared = prepare(engine, request)
    else:
        prepared = await anyio.to_thread.run_sync(prepare, engine, request)
    if stream.closed:
        raise ClientGoneError("the client left before the request started")
    wait_s = engine.expected_wait_s(target_s)
    if wait_s > target_s:
        raise DeadlineUnreachableError(loaded.name, target_s, wait_s)
    sink = _LoopSink(stream, progress)
    with loaded.running():
        handle = engine.submit(
            prepared.tokens,
            prepared.params,
            sink,
            target_s=target_s,
            incremental=stream.incremental,
            caller=request.caller if request.weight is not None else "",
            weight=request.weight or 1.0,
        )
        progress.running()
        forget = stream.when_closed(handle.cancel)
        try:
            outcome = await sink.done
        except BaseException:  # cancelled (shutdown): the sequence goes too
            handle.cancel()
            raise
        finally:
            forget()
    if isinstance(outcome, EngineFailure):
        if outcome.cancelled:
            raise ClientGoneError(outcome.message)
        raise EngineError(lease.loaded.name, outcome.message)
    return outcome


def _size(request: InferenceRequest) -> int:
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(message.content) for message in request.messages)
