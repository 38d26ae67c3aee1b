"""Serving the app with hypercorn's programmatic API, with graceful shutdown.

SIGTERM or SIGINT first fails readiness, so load balancers take this replica out, and goes on
serving for ``server.drain_delay_s``; then the server stops accepting connections, lets
in-flight requests finish (bounded by ``server.shutdown_timeout_s``), the lifespan closes
the models and the process exits 0. A second signal, or Ctrl-C in a terminal, skips the
delay. SIGHUP re-reads the config file and reloads the members whose spec changed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import structlog
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from ensemble_ops.config import Settings
from ensemble_ops.errors import ConfigError
from ensemble_ops.http.app import create_app
from ensemble_ops.reload.manager import ReloadManager
from ensemble_ops.serving.ensemble import Ensemble

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


def _in_terminal() -> bool:
    """Whether a person at a terminal runs the server (stdin may be closed or absent)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):
        return False


async def _reread_config(config_path: Path | None, reload: ReloadManager) -> None:
    """SIGHUP: re-read the config and reload the members whose spec changed."""
    if config_path is None:
        _log.warning(
            "config.reread_skipped",
            reason="no config file: the built-in ensemble has nothing to re-read",
        )
        return
    try:
        new = Settings.from_toml(config_path)
    except ConfigError as err:  # a bad edit changes nothing
        _log.error("config.reread_failed", path=str(config_path), error=str(err))
        return
    outcome = reload.apply_settings(new)
    _log.info("config.reread", path=str(config_path), members=outcome)


async def serve(settings: Settings, config_path: Path | None = None) -> int:
    """Run until SIGTERM/SIGINT; return the process exit status. SIGHUP re-reads
    ``config_path`` and reloads the members whose spec changed."""
    app = create_app(settings)
    ensemble: Ensemble = app.state.ensemble
    stop = asyncio.Event()
    exit_code = 0
    loop = asyncio.get_running_loop()
    delays: list[asyncio.Task[None]] = []

    async def stop_after(delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        stop.set()

    def on_stop_signal(signum: signal.Signals) -> None:
        if delays or stop.is_set():  # a second signal: no more waiting
            _log.info("server.stopping_now", signal=signum.name)
            stop.set()
            return
        delay = settings.server.drain_delay_s
        if signum == signal.SIGINT and _in_terminal():
            delay = 0.0  # Ctrl-C in a terminal: a person is waiting, no load balancer
        app.state.health.begin_shutdown()
        _log.info("server.draining", signal=signum.name, drain_delay_s=delay)
        delays.append(loop.create_task(stop_after(delay)))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal, signum)
    rereads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:  # a signal handler is no task: start one for the async work
        task = loop.create_task(_reread_config(config_path, app.state.reload))
        rereads.add(task)
        task.add_done_callback(rereads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)

    async def stop_when_nothing_loads() -> None:
        nonlocal exit_code
        await ensemble.loading_done.wait()
        if delays or stop.is_set():
            return  # stopping already: members the shutdown unloaded did not fail to load
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
        for delay in delays:
            delay.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    _log.info("server.stopped", exit_code=exit_code)
    return exit_code
