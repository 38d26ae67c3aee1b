"""Serving the apps with hypercorn's programmatic API, with graceful shutdown.

Two listeners: the public one (``server.host``/``port``) serves the inference API, health and
metrics; the admin one (``server.admin_bind``: loopback or a Unix socket by default) serves
the admin routes too. Their sockets are bound before serving, so a port 0 is known and
logged (``server.listening``).

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
import socket
import sys
from pathlib import Path

import structlog
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app

from ensemble_ops.config import Settings, admin_address
from ensemble_ops.errors import ConfigError
from ensemble_ops.http.app import create_app
from ensemble_ops.reload.manager import ReloadManager
from ensemble_ops.serving.ensemble import Ensemble

__all__ = ["serve"]

_log = structlog.get_logger("ensemble_ops.server")


def _hypercorn_config(settings: Settings, bind: str, *, access_log: bool) -> Config:
    server = settings.server
    config = Config()
    config.bind = [bind]
    # Logger objects, not "-": hypercorn's lines then go through the structlog formatter.
    config.accesslog = logging.getLogger("hypercorn.access") if access_log else None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = server.shutdown_timeout_s
    # Loading happens after start-up (readiness says when), so start-up itself is quick.
    config.startup_timeout = 60.0
    return config


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _admin_bind(settings: Settings) -> str:
    """The admin listener's hypercorn bind; a stale socket file from an earlier run goes."""
    address = admin_address(settings.server.admin_bind)
    if isinstance(address, str):
        path = Path(address)
        if path.is_socket():
            path.unlink()
        return f"unix:{address}"
    return _bind(*address)


def _listeners(settings: Settings) -> tuple[tuple[Config, Sockets], tuple[Config, Sockets]]:
    """The public and the admin listener's configs and bound sockets."""
    server = settings.server
    public = _hypercorn_config(
        settings, _bind(server.host, server.port), access_log=server.access_log
    )
    admin = _hypercorn_config(settings, _admin_bind(settings), access_log=server.access_log)
    public_sockets, admin_sockets = public.create_sockets(), admin.create_sockets()
    admin_socket = admin_sockets.insecure_sockets[0]
    if admin_socket.family == socket.AF_UNIX:
        Path(admin_socket.getsockname()).chmod(0o600)  # the owner's only: it is the admin
    return (public, public_sockets), (admin, admin_sockets)


def _bound(sockets: Sockets) -> str:
    """Where a listener really is (a port 0 resolved), for the log and for clients."""
    sock = sockets.insecure_sockets[0]
    name = sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    return _bind(name[0], name[1])


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
        app.state.events.close()  # open event streams end now, so they never hold the stop
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
    (public, public_sockets), (admin, admin_sockets) = _listeners(settings)
    _log.info("server.listening", public=_bound(public_sockets), admin=_bound(admin_sockets))
    try:
        await asyncio.gather(
            worker_serve(
                wrap_app(app, public.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                public,
                sockets=public_sockets,
                shutdown_trigger=stop.wait,
            ),
            worker_serve(
                wrap_app(app.state.admin_app, admin.wsgi_max_body_size, "asgi"),
                admin,
                sockets=admin_sockets,
                shutdown_trigger=stop.wait,
            ),
        )
    finally:
        watcher.cancel()
        for delay in delays:
            delay.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    _log.info("server.stopped", exit_code=exit_code)
    return exit_code
