"""Serving the app with hypercorn's programmatic API, with graceful shutdown.

SIGTERM or SIGINT stops accepting connections, lets in-flight requests finish (bounded by
``server.shutdown_timeout_s``), then the lifespan closes the models and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import structlog
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from .app import create_app
from .config import Settings
from .ensemble import Ensemble

__all__ = ["serve"]

_log = structlog.get_logger("ensemble_ops.server")


def _hypercorn_config(settings: Settings) -> Config:
    server = settings.server
    config = Config()
    host = f"[{server.host}]" if ":" in server.host else server.host
    config.bind = [f"{host}:{server.port}"]
    # Logger objects, not "-": hypercorn's lines then go through the structlog formatter.
    config.accesslog = logging.getLogger("hypercorn.access") if server.access_log else None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = server.shutdown_timeout_s
    # Loading happens after start-up (readiness says when), so start-up itself is quick.
    config.startup_timeout = 60.0
    return config


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; return the process exit status."""
    app = create_app(settings)
    ensemble: Ensemble = app.state.ensemble
    stop = asyncio.Event()
    exit_code = 0
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def stop_when_nothing_loads() -> None:
        nonlocal exit_code
        await ensemble.loading_done.wait()
        if not any(slot.active for slot in ensemble.slots.values()):
            _log.error(
                "ensemble.no_model_loaded",
                reasons={name: slot.error for name, slot in ensemble.slots.items()},
            )
            exit_code = 1
            stop.set()

    watcher = asyncio.create_task(stop_when_nothing_loads())
    try:
        await hypercorn_serve(app, _hypercorn_config(settings), shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    finally:
        watcher.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    _log.info("server.stopped", exit_code=exit_code)
    return exit_code
