"""The composition root: builds the ensemble, the views, and the two Starlette apps.

The public app serves the inference API, health and metrics; the admin app, served on the
admin listener only, adds the admin routes. Both share every object; the public app's
lifespan loads and closes the models.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware

from ensemble_ops.access.gate import Gate
from ensemble_ops.access.keys import Keyring
from ensemble_ops.access.limits import Limits
from ensemble_ops.config import ApiKeySpec, Settings
from ensemble_ops.events import EventBus
from ensemble_ops.health.checker import HealthChecker
from ensemble_ops.health.probe import Prober
from ensemble_ops.health.resources import ProcessResources
from ensemble_ops.health.view import HealthView
from ensemble_ops.health.watchdog import Watchdog
from ensemble_ops.http.auth import ADMIN, PUBLIC
from ensemble_ops.http.errors import EXCEPTION_HANDLERS
from ensemble_ops.http.middleware import BodyLimitMiddleware, RequestContextMiddleware
from ensemble_ops.http.openapi import openapi_route
from ensemble_ops.http.routes import admin as reload_routes
from ensemble_ops.http.routes import events as event_routes
from ensemble_ops.http.routes import health as health_routes
from ensemble_ops.http.routes import metrics as metrics_routes
from ensemble_ops.http.routes import openai as api
from ensemble_ops.http.routes import status as status_routes
from ensemble_ops.observability.compute_readings import ComputeReadings
from ensemble_ops.observability.event_feed import EventFeed
from ensemble_ops.observability.log_view import subscribe_log
from ensemble_ops.observability.metrics import Metrics
from ensemble_ops.observability.recent import RecentFigures
from ensemble_ops.observability.tracing import build_tracer_provider, tracer_of
from ensemble_ops.reload.manager import ReloadManager
from ensemble_ops.serving.compute import ComputeArbiter, available_cores
from ensemble_ops.serving.ensemble import EngineLoader, Ensemble
from ensemble_ops.serving.gpu import GpuMonitor
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.tasks import TaskRunner

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["create_app"]

_log = structlog.get_logger("ensemble_ops.app")


def create_app(
    settings: Settings,
    *,
    loader: EngineLoader | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Starlette:
    """Build the public app (``app.state.admin_app`` is the admin one). Models load in the
    background once the lifespan starts, so the server answers (readiness 503) while they
    load; ``loader`` is the engine factory (default: ``LlamaEngine.load`` with the app's
    compute arbiter, which every member's decode steps share).

    ``tracer_provider`` receives the app's spans (tests pass one with an in-memory
    exporter); without one, ``[tracing]`` decides, and tracing off means no SDK at all.
    """
    own_provider = tracer_provider is None
    provider = build_tracer_provider(settings.tracing) if own_provider else tracer_provider
    tracer = tracer_of(provider)
    bus = EventBus()
    runner = TaskRunner()
    compute = ComputeArbiter(settings.server.compute_threads or available_cores())
    loader = loader or functools.partial(LlamaEngine.load, compute=compute)
    subscribe_log(bus)
    members = [spec.name for spec in settings.models]
    view = HealthView(bus, settings.health, members)
    ensemble = Ensemble(settings, bus, loader, runner, can_serve=view.can_serve, tracer=tracer)
    keyring = Keyring(settings.auth)
    limits = Limits.for_settings(settings, bus)
    metrics = Metrics(
        enabled=settings.metrics.enabled,
        members=members,
        default_mode=settings.default_mode,
        cache_backend=ensemble.cache.backend if ensemble.cache is not None else None,
        keys={key.name: _limits_of(key) for key in settings.auth.keys},
        shared_limits=limits.redis is not None,
    )
    metrics.subscribe(bus)
    metrics.on_collect(lambda m: _collect_slots(m, ensemble))
    metrics.on_collect(ComputeReadings(compute, members).collect)
    feed = EventFeed(bus, on_drop=lambda: metrics.event_clients_dropped.inc({}))
    metrics.on_collect(lambda m: m.event_clients.set({}, feed.followers))
    recent = RecentFigures(bus, members)
    watchdog = Watchdog(settings.health, ensemble.instances, bus)
    gpu = GpuMonitor()
    health = HealthChecker(
        ensemble.slots,
        view,
        Prober(bus, settings.health, runner, lambda name: view.record(name).last_inference_s),
        ProcessResources(gpu),
        liveness=watchdog.verdict,
        loading=lambda: not ensemble.loading_done.is_set(),
    )
    model_dir = settings.reload.model_dir
    reload = ReloadManager(
        bus,
        ensemble.slots,
        settings.reload,
        runner,
        loader=loader,
        gpu=gpu,
        load_limiter=ensemble.load_limiter,
        allowed_dirs=[model_dir] if model_dir is not None else None,
        tracer=tracer,
        identify=ensemble.identify,
        quality=settings.quality,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        _log.info("ensemble.starting", models=members, default_mode=settings.default_mode)
        metrics.bind_loop(asyncio.get_running_loop())
        runner.spawn(watchdog.run)
        runner.spawn(ensemble.load_all)
        runner.spawn(ensemble.cache_health)  # say at once whether a shared cache answers
        runner.spawn(limits.health)  # and whether the shared limits' Redis does
        try:
            yield
        finally:
            feed.close()  # open event streams end now: they never hold the shutdown
            with anyio.CancelScope(shield=True):
                await ensemble.close(settings.server.shutdown_timeout_s)
                await runner.aclose()
                if limits.redis is not None:
                    await limits.redis.aclose()
            gpu.close()
            if own_provider and provider is not None:  # flush what is still batched
                await anyio.to_thread.run_sync(provider.shutdown)
        _log.info("ensemble.stopped")

    readable = [
        *api.routes,
        *status_routes.routes,
        *event_routes.routes,
        *health_routes.routes,
        *reload_routes.status_routes,
        *(metrics_routes.routes if settings.metrics.enabled else []),
    ]
    app = _starlette(settings, tracer, [*readable], lifespan)
    admin = _starlette(settings, tracer, [*readable, *reload_routes.routes], None)
    shared = {
        "settings": settings,
        "ensemble": ensemble,
        "bus": bus,
        "health": health,
        "watchdog": watchdog,
        "reload": reload,
        "metrics": metrics,
        "compute": compute,
        "keyring": keyring,
        "gate": Gate(limits, bus),
        "limits": limits,
        "events": feed,
        "recent": recent,
        "csrf_token": secrets.token_urlsafe(32),  # the admin status page's, per process
    }
    for listener, served in ((PUBLIC, app), (ADMIN, admin)):
        for name, value in shared.items():
            setattr(served.state, name, value)
        served.state.listener = listener
    app.state.admin_app = admin
    return app


def _starlette(
    settings: Settings,
    tracer: Any,
    routes: list[Any],
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None,
) -> Starlette:
    """One listener's app: its routes and /openapi.json, the middleware, the error table."""
    members = [spec.name for spec in settings.models]
    return Starlette(
        routes=[openapi_route(members=members), *routes],
        middleware=[
            Middleware(RequestContextMiddleware, tracer=tracer),
            Middleware(BodyLimitMiddleware, max_bytes=settings.server.max_body_bytes),
        ],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )


def _limits_of(key: ApiKeySpec) -> tuple[str, ...]:
    """The limits a key has, by their names in ``llm_rate_limited_total``."""
    named = (("requests", key.rpm), ("tokens", key.tpm), ("parallel", key.max_parallel))
    return tuple(name for name, value in named if value is not None)


def _collect_slots(metrics: Metrics, ensemble: Ensemble) -> None:
    """Read from the members at scrape time: requests holding each, those waiting for a
    sequence slot, the KV cache in use, and the batch sizes of the steps since the last
    scrape."""
    for name, slot in ensemble.slots.items():
        active = slot.active
        if active is None:
            metrics.active.set({"model": name}, 0)
            metrics.queue_depth.set({"model": name}, 0)
            metrics.set_kv_cache_usage(name, 0.0, 0.0)
            continue
        metrics.active.set({"model": name}, active.in_flight)
        metrics.queue_depth.set({"model": name}, max(active.in_flight - active.parallel, 0))
        metrics.set_kv_cache_usage(name, active.engine.kv_usage, active.engine.kv_retained)
        metrics.observe_batch_sizes(name, active.engine.drain_batch_sizes())
