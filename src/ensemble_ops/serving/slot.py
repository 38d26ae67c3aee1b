"""A member of the ensemble: its spec and an atomic reference to the loaded instance.

Requests *lease* the instance that is active at that moment; a reload *swaps* the reference
in one assignment and closes the old instance only after its last lease ends. Everything
here runs on the event loop, so plain attributes are atomic and need no lock.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal, ParamSpec, TypeVar

import anyio
import anyio.to_thread

from ensemble_ops.config import ModelSpec
from ensemble_ops.errors import ModelUnavailableError, OverloadedError
from ensemble_ops.events import ModelLoaded
from ensemble_ops.serving.engine import Engine

__all__ = ["Lease", "Loaded", "ModelSlot", "SlotState", "loaded_event"]

P = ParamSpec("P")
T = TypeVar("T")
SlotState = Literal["loading", "ready", "reloading", "failed", "stopped"]

_generations = itertools.count(1)


class Loaded:
    """One loaded instance of a model, running one completion at a time in a worker thread."""

    def __init__(self, name: str, engine: Engine) -> None:
        self.name = name
        self.engine = engine
        self.generation = next(_generations)
        self.loaded_at = time.time()
        # One at a time: a llama.cpp context is not thread-safe. Waiting happens on the
        # event loop (anyio parks the task), so a queued request holds no thread.
        self.limiter = anyio.CapacityLimiter(1)
        self.running_since: float | None = None
        """monotonic() when the running inference started; None when idle (watchdog)."""
        self.closed = False
        self._leases: set[Lease] = set()
        self._idle: anyio.Event | None = None

    @property
    def in_flight(self) -> int:
        """Requests holding this instance: the one running plus those queued for it."""
        return len(self._leases)

    def oldest_lease_s(self, now: float) -> float:
        """How long the longest-held lease has been held (0 when none)."""
        return max((now - lease.acquired_at for lease in self._leases), default=0.0)

    async def run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``func`` in a worker thread once this instance is free."""
        return await anyio.to_thread.run_sync(self._timed(func, *args), limiter=self.limiter)

    def claim(self) -> object:
        """Take this instance now, before any request waiting for it, for one
        :meth:`run_claimed`; raise ``anyio.WouldBlock`` when it is busy or requests wait."""
        token = object()
        self.limiter.acquire_on_behalf_of_nowait(token)
        return token

    async def run_claimed(self, token: object, func: Callable[..., T], *args: Any) -> T:
        """Run ``func`` in a worker thread on the instance ``token`` claimed, then free it."""
        try:
            return await anyio.to_thread.run_sync(self._timed(func, *args))
        finally:
            self.limiter.release_on_behalf_of(token)

    def _timed(self, func: Callable[..., T], *args: Any) -> Callable[[], T]:
        def call() -> T:
            self.running_since = time.monotonic()
            try:
                return func(*args)
            finally:
                self.running_since = None

        return call

    def _enter(self, lease: Lease) -> None:
        self._leases.add(lease)

    def _leave(self, lease: Lease) -> None:
        self._leases.discard(lease)
        if not self._leases and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no lease is held; False if ``timeout_s`` passed first."""
        with anyio.move_on_after(timeout_s):
            while self.in_flight:
                self._idle = anyio.Event()
                await self._idle.wait()
            return True
        return False

    async def close(self) -> None:
        """Free the engine once no inference runs on it (in a thread: freeing takes a while).

        Taking the limiter means a close waits for a running (or abandoned) inference.
        """
        if self.closed:
            return
        self.closed = True
        await anyio.to_thread.run_sync(self.engine.close, limiter=self.limiter)


def loaded_event(loaded: Loaded, load_s: float) -> ModelLoaded:
    """The event announcing ``loaded`` as its member's active instance."""
    info = loaded.engine.info
    return ModelLoaded(
        loaded.name,
        loaded.generation,
        info.weights_bytes,
        info.context_bytes,
        load_s,
        gpu_bytes=info.gpu_bytes,
    )


class Lease:
    """A request's hold on one instance; ``release`` is idempotent."""

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.acquired_at = time.monotonic()
        self._released = False
        loaded._enter(self)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.loaded._leave(self)


class ModelSlot:
    """One ensemble member."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.state: SlotState = "loading"
        self.error: str | None = None
        self._active: Loaded | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def active(self) -> Loaded | None:
        return self._active

    def unavailable_reason(self) -> str | None:
        """Why this member cannot take a request now, or None when it can."""
        if self._active is not None:
            return None
        if self.state == "loading":
            return "the model is still loading"
        if self.state == "failed":
            return f"the model failed to load ({self.error})"
        if self.state == "reloading":
            return "the model is being reloaded (its old copy was unloaded first)"
        return "the model is not loaded"

    def acquire(self) -> Lease:
        """Lease the active instance, or raise if there is none or its queue is full."""
        active = self._active
        if active is None:
            raise ModelUnavailableError(self.name, self.unavailable_reason() or "not loaded")
        # One runs, queue_size wait; one more would wait without a place in line.
        if active.in_flight > self.spec.queue_size:
            raise OverloadedError(self.name, self.spec.queue_size)
        return Lease(active)

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Loaded]:
        held = self.acquire()
        try:
            yield held.loaded
        finally:
            held.release()

    def swap(self, new: Loaded, spec: ModelSpec | None = None) -> Loaded | None:
        """Make ``new`` the active instance in one step; return the one it replaced.

        ``spec`` is the member's spec from now on (a reload may change its file or settings).
        """
        old, self._active = self._active, new
        self.state = "ready"
        if spec is not None:
            self.spec = spec
        return old

    def unload(self, state: Literal["reloading", "stopped"]) -> Loaded | None:
        """Stop handing out the active instance (``reloading``: a reload that replaces it in
        memory; ``stopped``: shutdown); return it for the caller to drain and close."""
        old, self._active = self._active, None
        self.state = state
        return old

    def install(self, engine: Engine) -> Loaded:
        """Make a freshly loaded ``engine`` the active instance (nothing was active)."""
        loaded = Loaded(self.name, engine)
        self.swap(loaded)
        return loaded

    def mark_failed(self, error: str) -> None:
        self.state = "failed"
        self.error = error
