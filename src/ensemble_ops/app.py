"""The composition root: builds the ensemble, the views and the Starlette app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import api, health_routes, metrics_routes, reload_routes
from .config import Settings
from .engine import LlamaEngine
from .ensemble import EngineLoader, Ensemble
from .errors_http import EXCEPTION_HANDLERS
from .events import EventBus
from .health import HealthChecker
from .log_view import subscribe_log
from .metrics import Metrics, set_default_metrics
from .middleware import BodyLimitMiddleware, RequestContextMiddleware
from .openapi import build_openapi
from .reload import ReloadManager
from .watchdog import Watchdog

__all__ = ["create_app"]

_log = structlog.get_logger("ensemble_ops.app")


def create_app(settings: Settings, *, loader: EngineLoader = LlamaEngine.load) -> Starlette:
    """Build the app. Models load in the background once the lifespan starts, so the
    server answers (readiness 503) while they load; ``loader`` is the engine factory."""
    bus = EventBus()
    subscribe_log(bus)
    ensemble = Ensemble(settings, bus, loader)
    metrics = Metrics(
        enabled=settings.metrics.enabled,
        members=list(ensemble.slots),
        default_mode=settings.default_mode,
    )
    metrics.subscribe(bus)
    metrics.on_collect(lambda m: _collect_slots(m, ensemble))
    set_default_metrics(metrics)  # the module-level helpers feed this app's registry
    watchdog = Watchdog(settings.health, ensemble.instances, bus)
    health = HealthChecker(
        bus,
        settings.health,
        ensemble.slots,
        liveness=watchdog.verdict,
        loading=lambda: not ensemble.loading_done.is_set(),
    )
    ensemble.health_gate = health.view.can_serve
    model_dir = settings.reload.model_dir
    reload = ReloadManager(
        bus,
        ensemble.slots,
        settings.reload,
        loader=loader,
        load_limiter=ensemble.load_limiter,
        allowed_dirs=[model_dir] if model_dir is not None else None,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        _log.info(
            "ensemble.starting",
            models=[spec.name for spec in settings.models],
            default_mode=settings.default_mode,
        )
        metrics.bind_loop(asyncio.get_running_loop())
        async with anyio.create_task_group() as tasks:
            ensemble.attach(tasks)
            health.tasks = tasks
            reload.tasks = tasks
            tasks.start_soon(watchdog.run)
            tasks.start_soon(ensemble.load_all)
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await ensemble.close(settings.server.shutdown_timeout_s)
                tasks.cancel_scope.cancel()
                health.gpu.close()
        _log.info("ensemble.stopped")

    document = build_openapi(members=list(ensemble.slots), metrics=settings.metrics.enabled)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    app = Starlette(
        routes=[
            Route("/openapi.json", openapi, methods=["GET"]),
            *api.routes,
            *health_routes.routes,
            *reload_routes.routes,
            *(metrics_routes.routes if settings.metrics.enabled else []),
        ],
        middleware=[
            Middleware(RequestContextMiddleware),
            Middleware(BodyLimitMiddleware, max_bytes=settings.server.max_body_bytes),
        ],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ensemble = ensemble
    app.state.bus = bus
    app.state.health = health
    app.state.watchdog = watchdog
    app.state.reload = reload
    app.state.metrics = metrics
    return app


def _collect_slots(metrics: Metrics, ensemble: Ensemble) -> None:
    """Gauges read from the members at scrape time: requests holding each, and waiting."""
    for name, slot in ensemble.slots.items():
        in_flight = slot.active.in_flight if slot.active is not None else 0
        metrics.active.set({"model": name}, in_flight)
        metrics.queue_depth.set({"model": name}, max(in_flight - 1, 0))
