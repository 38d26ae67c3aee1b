"""A member of the ensemble: its spec and an atomic reference to the loaded instance.

Requests *lease* the instance that is active at that moment; a reload *swaps* the reference
in one assignment and closes the old instance only after its last lease ends. Everything
here runs on the event loop, so plain attributes are atomic and need no lock.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal, ParamSpec, TypeVar

import anyio
import anyio.to_thread

from ensemble_ops.config import ModelSpec
from ensemble_ops.errors import InvalidRequestError, ModelUnavailableError, OverloadedError
from ensemble_ops.events import Copy, ModelLoaded
from ensemble_ops.serving.engine import Capability, Engine
from ensemble_ops.serving.sticky import bucket

__all__ = ["Lease", "Loaded", "ModelSlot", "SlotState", "loaded_event"]

P = ParamSpec("P")
T = TypeVar("T")
SlotState = Literal["loading", "ready", "reloading", "failed", "stopped"]

_generations = itertools.count(1)


class Loaded:
    """One loaded instance of a model; its engine batches the requests running on it."""

    def __init__(
        self, name: str, engine: Engine, *, queue_size: int = 16, identity: str | None = None
    ) -> None:
        self.name = name
        self.engine = engine
        self.identity = identity
        """What its answers are cached under (``cache.model_identity``); None: not cached."""
        self.generation = next(_generations)
        self.loaded_at = time.time()
        self.parallel = engine.info.parallel
        self.capacity = self.parallel + queue_size
        """Leases it takes: ``parallel`` decoding, ``queue_size`` waiting; more get 503."""
        # Each request blocks a worker thread while it waits in the engine's admission
        # queue or runs in the batch; one more thread is for a probe. A limiter of its own,
        # so a busy member never takes the others' threads (anyio's default is 40 in all).
        self.limiter = anyio.CapacityLimiter(self.capacity + 1)
        self.closed = False
        self._leases: set[Lease] = set()
        self._idle: anyio.Event | None = None
        self._running: dict[object, float] = {}
        self._quiet: anyio.Event | None = None  # set when the last running call ends
        self._finished: deque[float] = deque(maxlen=256)

    @property
    def in_flight(self) -> int:
        """Requests holding this instance: those running plus those queued for it."""
        return len(self._leases)

    @property
    def running_since(self) -> float | None:
        """monotonic() when the oldest running inference started; None when idle."""
        return min(self._running.values(), default=None)

    def oldest_lease_s(self, now: float) -> float:
        """How long the longest-held lease has been held (0 when none)."""
        return max((now - lease.acquired_at for lease in self._leases), default=0.0)

    def retry_after_s(self) -> int:
        """Seconds until a place in the queue is likely free, from the measured rate of
        answers over the last minute (1 without data, at most 60)."""
        now = time.monotonic()
        recent = [t for t in self._finished if now - t < 60.0]
        if len(recent) < 2:
            return 1
        rate = (len(recent) - 1) / max(recent[-1] - recent[0], 1e-3)
        waiting = max(self.in_flight - self.parallel, 0) + 1
        return min(max(math.ceil(waiting / rate), 1), 60)

    async def run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking ``func`` in a worker thread (a warm-up that waits for its answer)."""
        with self.running():
            return await anyio.to_thread.run_sync(
                functools.partial(func, *args, **kwargs), limiter=self.limiter
            )

    def claim(self) -> object:
        """Take a worker thread now for one :meth:`run_claimed` (a probe); raise
        ``anyio.WouldBlock`` when every thread is taken."""
        token = object()
        self.limiter.acquire_on_behalf_of_nowait(token)
        return token

    async def run_claimed(self, token: object, func: Callable[..., T], *args: Any) -> T:
        """Run ``func`` in a worker thread on the thread ``token`` claimed, then free it."""
        try:
            with self.running():
                return await anyio.to_thread.run_sync(functools.partial(func, *args))
        finally:
            self.limiter.release_on_behalf_of(token)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Count an inference as running (watchdog) and its end as an answer (Retry-After);
        on the event loop, so the bookkeeping needs no lock. Closing waits for every one."""
        key = object()
        self._running[key] = time.monotonic()
        try:
            yield
        finally:
            del self._running[key]
            self._finished.append(time.monotonic())
            if not self._running and self._quiet is not None:
                self._quiet.set()

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

        It waits for every running call, abandoned ones included: freeing a model under a
        running decode would crash the process.
        """
        if self.closed:
            return
        self.closed = True
        while self._running:
            self._quiet = anyio.Event()
            await self._quiet.wait()
        await anyio.to_thread.run_sync(self.engine.close)


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

    def __init__(self, loaded: Loaded, copy: Copy = "stable") -> None:
        self.loaded = loaded
        self.copy = copy
        """Which of the member's copies it holds (a rollout serves two)."""
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
        self._candidate: Loaded | None = None
        self.weight_percent = 0.0
        """The share of requests the candidate answers (a canary's step)."""
        self.shadow_percent = 0.0
        """The share of requests mirrored to the candidate, answers discarded (a shadow)."""

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

    @property
    def candidate(self) -> Loaded | None:
        """A rollout's new copy while it serves beside the active one."""
        return self._candidate

    def capable(self, needs: Capability) -> bool | None:
        """Whether the serving copy can do ``needs``; None while no copy is loaded."""
        if self._active is None:
            return None
        return needs in self._active.engine.info.capabilities

    def choose(self, session: str | None, asked: Copy | None = None) -> Copy:
        """Which copy answers a request: the one it asks for, else the candidate for the
        canary's share of session keys (sticky: a key always gets the same copy)."""
        if asked is not None:
            if asked == "candidate" and self._candidate is None:
                raise InvalidRequestError(
                    f"X-Ensemble-Copy asks for the new copy of {self.name!r}, but no rollout "
                    "of it is serving one.",
                    param="X-Ensemble-Copy",
                )
            return asked
        # Salted with the member: a split of members uses the same keys, and an unsalted
        # draw would send one split side's sessions all to one copy.
        key = None if session is None else f"{self.name}/rollout/{session}"
        if self._candidate is not None and bucket(key) < self.weight_percent:
            return "candidate"
        return "stable"

    def serving(self, copy: Copy = "stable") -> Loaded | None:
        """The instance behind ``copy``: the active one, or a rollout's candidate."""
        return self._candidate if copy == "candidate" else self._active

    def acquire(self, copy: Copy = "stable") -> Lease:
        """Lease the copy (the active instance by default), or raise if there is none or its
        queue is full."""
        loaded = self.serving(copy)
        if loaded is None:
            reason = "no new copy is being rolled out" if copy == "candidate" else None
            raise ModelUnavailableError(
                self.name, reason or self.unavailable_reason() or "not loaded"
            )
        # One runs, queue_size wait; one more would wait without a place in line.
        if loaded.in_flight >= loaded.capacity:
            raise OverloadedError(
                self.name, self.spec.queue_size, retry_after_s=loaded.retry_after_s()
            )
        return Lease(loaded, copy)

    @asynccontextmanager
    async def lease(self, copy: Copy = "stable") -> AsyncIterator[Lease]:
        held = self.acquire(copy)
        try:
            yield held
        finally:
            held.release()

    def offer(self, candidate: Loaded, *, weight_percent: float = 0.0, shadow: float = 0.0) -> None:
        """Serve ``candidate`` beside the active copy: it answers ``weight_percent`` of the
        requests (0: only those that ask for it) and sees ``shadow`` percent mirrored."""
        self._candidate = candidate
        self.weight_percent, self.shadow_percent = weight_percent, shadow

    def withdraw(self) -> Loaded | None:
        """Stop serving the candidate (requests already on it finish); return it."""
        candidate, self._candidate = self._candidate, None
        self.weight_percent = self.shadow_percent = 0.0
        return candidate

    def swap(self, new: Loaded, spec: ModelSpec | None = None) -> Loaded | None:
        """Make ``new`` the active instance in one step; return the one it replaced.

        ``spec`` is the member's spec from now on (a reload may change its file or settings).
        """
        old, self._active = self._active, new
        if self._candidate is new:  # a rollout's promotion: the candidate is the copy now
            self.withdraw()
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

    def install(self, engine: Engine, identity: str | None = None) -> Loaded:
        """Make a freshly loaded ``engine`` the active instance (nothing was active)."""
        loaded = Loaded(self.name, engine, queue_size=self.spec.queue_size, identity=identity)
        self.swap(loaded)
        return loaded

    def mark_failed(self, error: str) -> None:
        self.state = "failed"
        self.error = error
