"""The ensemble: its members and their lifecycle, and the entry to the request path.

The members (``ModelSlot``) are loaded at start-up and closed at shutdown here; each request
walks the stages of ``serving/pipeline.py``: routing, the rollout's copy, answers already
known, running on the member.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import anyio.to_thread
from opentelemetry.trace import NoOpTracer, Tracer

from ensemble_ops.config import ModelSpec, ModeName, Settings
from ensemble_ops.events import EventBus, ModelLoadFailed, ModelUnloaded
from ensemble_ops.serving.answers import KnownAnswers
from ensemble_ops.serving.cache import (
    CacheHealth,
    DigestStore,
    ResponseCache,
    default_digest_file,
    model_identity,
    open_cache,
)
from ensemble_ops.serving.copies import Copies
from ensemble_ops.serving.engine import Engine
from ensemble_ops.serving.inference import (
    ENSEMBLE,
    InferenceRequest,
    InferenceResult,
    TextStream,
)
from ensemble_ops.serving.pipeline import Pipeline
from ensemble_ops.serving.routing import Router
from ensemble_ops.serving.slot import Loaded, ModelSlot, loaded_event
from ensemble_ops.tasks import TaskRunner

__all__ = [
    "ENSEMBLE",
    "EngineLoader",
    "Ensemble",
    "InferenceRequest",
    "InferenceResult",
    "TextStream",
]

EngineLoader = Callable[[ModelSpec], Engine]
"""Loads a member's engine from its ModelSpec (blocking; run in a worker thread)."""


class Ensemble:
    """Members by name; loads and closes them, and answers requests through the pipeline."""

    def __init__(
        self,
        settings: Settings,
        bus: EventBus,
        loader: EngineLoader,
        runner: TaskRunner,
        *,
        can_serve: Callable[[str], bool] = lambda name: True,
        tracer: Tracer | None = None,
    ) -> None:
        """``runner`` runs each request's walk; ``can_serve`` tells routing whether a member
        is fit to serve (the health view's verdict), so unfit ones are tried last; ``tracer``
        makes a span of each attempt (a no-op one when tracing is off)."""
        self.settings = settings
        self.bus = bus
        self._loader = loader
        self.slots = {spec.name: ModelSlot(spec) for spec in settings.models}
        self.cache: ResponseCache | None = open_cache(settings.cache, bus)
        self._digests = DigestStore(settings.cache.digest_file or default_digest_file())
        self.loading_done = anyio.Event()
        self._closing = False
        # Loads are memory-heavy: few at a time, shared with reloads.
        self.load_limiter = anyio.CapacityLimiter(settings.reload.max_concurrent_loads)
        self.router = Router(settings, self.slots, can_serve)
        self._pipeline = Pipeline(
            router=self.router,
            copies=Copies(bus, runner, self.target_s),
            known=KnownAnswers(self.cache),
            bus=bus,
            runner=runner,
            tracer=tracer or NoOpTracer(),
            target_s=self.target_s,
            capture_content=settings.tracing.capture_content,
        )

    def target_s(self, mode: ModeName) -> float:
        """A mode's latency target: its requests' deadline is arrival + this, in every
        member's admission and for the machine's cores (``modes.<mode>.latency_target_s``)."""
        return self.settings.modes[mode].latency_target_s

    # -- requests ----------------------------------------------------------------------------

    def answer(self, request: InferenceRequest, *, incremental: bool) -> TextStream:
        """Start answering ``request``: its stream, with pieces as they come when
        ``incremental`` (a streamed request), else only the end."""
        return self._pipeline.start(request, incremental=incremental)

    async def complete(self, request: InferenceRequest) -> InferenceResult:
        """Answer ``request`` whole: the stream of :meth:`answer`, collected."""
        stream = self.answer(request, incremental=False)
        try:
            completion = await stream.wait()
        except BaseException:
            stream.close()  # the caller is gone (or failed): stop generating for it
            raise
        assert stream.member is not None
        return InferenceResult(stream.member, completion, stream.cached)

    def instances(self) -> list[Loaded]:
        """Every loaded instance (for the watchdog)."""
        return [slot.active for slot in self.slots.values() if slot.active is not None]

    # -- lifecycle ---------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every member (one at a time); a member that fails is marked, not fatal."""
        try:
            for slot in self.slots.values():
                await self.load(slot)
        finally:
            self.loading_done.set()

    def identify(self, spec: ModelSpec) -> str | None:
        """What a copy loaded from ``spec`` is cached under; None with the cache off (then
        the file is not hashed). Blocking: run it in a worker thread."""
        if self.cache is None:
            return None
        return model_identity(spec, self._digests.digest(spec.path))

    async def cache_health(self) -> CacheHealth | None:
        """The response cache's backend state; None with the cache off."""
        return await self.cache.health() if self.cache is not None else None

    async def load(self, slot: ModelSlot) -> Loaded | None:
        started = time.perf_counter()

        def load_and_identify() -> tuple[Engine, str | None]:
            try:
                identity = self.identify(slot.spec)  # before loading: the bytes that load
            except OSError:
                identity = None  # unreadable: the loader says why in its own words
            return self._loader(slot.spec), identity

        try:
            engine, identity = await anyio.to_thread.run_sync(
                load_and_identify, limiter=self.load_limiter
            )
        except Exception as err:
            slot.mark_failed(str(err))
            self.bus.publish(ModelLoadFailed(slot.name, str(err)))
            return None
        if self._closing:  # shut down while this member was loading
            await anyio.to_thread.run_sync(engine.close)
            return None
        loaded = slot.install(engine, identity)
        self.bus.publish(loaded_event(loaded, time.perf_counter() - started))
        return loaded

    async def close(self, drain_timeout_s: float) -> None:
        """Stop every member: wait for in-flight work (bounded), then free the models."""
        self._closing = True
        for slot in self.slots.values():
            candidate = slot.withdraw()  # a rollout's new copy: the old one is the member
            if candidate is not None:
                await candidate.wait_idle(drain_timeout_s)
                await candidate.close()
            old = slot.unload("stopped")
            if old is None:
                continue
            await old.wait_idle(drain_timeout_s)
            await old.close()
            self.bus.publish(ModelUnloaded(slot.name, old.generation))
        if self.cache is not None:
            await self.cache.aclose()
