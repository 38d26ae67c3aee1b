"""Where the CLI finds a server's admin listener, and how it talks to it.

The address comes from ``--admin-url``, else the ``[server]`` section of ``--config`` (only
that section is read, so this works on a host without the model files), else
``$ENSEMBLE_OPS_SERVER__ADMIN_BIND``, else the default ``127.0.0.1:8001``. A ``unix:/path``
listener is reached over its socket. Standard library only (http.client): the CLI works
wherever the server is installed.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ensemble_ops.config import ENV_PREFIX, admin_address
from ensemble_ops.config.sections import ServerSettings

__all__ = ["AdminCallError", "AdminClient", "AdminUnreachableError", "admin_client"]

_TIMEOUT_S = 30.0


class AdminCallError(Exception):
    """The admin listener answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class AdminUnreachableError(Exception):
    """Nothing answered at the admin address."""


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket; http.client has no such connection of its own."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass(frozen=True)
class AdminClient:
    """Calls to one admin listener: ``url`` is ``http(s)://host:port`` or ``unix:/path``."""

    url: str
    token: str | None = None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The JSON answer; raises ``AdminCallError`` for an error status and
        ``AdminUnreachableError`` when nothing answers."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        connection = self._connection()
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except OSError as err:
            raise AdminUnreachableError(f"cannot reach {self.url}: {err}") from err
        finally:
            connection.close()
        if response.status >= 400:
            raise AdminCallError(response.status, _message(raw, response.reason, self.url))
        return json.loads(raw)

    def _connection(self) -> http.client.HTTPConnection:
        if self.url.startswith("unix:"):
            return _UnixConnection(self.url.removeprefix("unix:"), _TIMEOUT_S)
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or parts.hostname is None:
            raise AdminUnreachableError(
                f"--admin-url must be http://host:port or unix:/path, not {self.url!r}"
            )
        if parts.scheme == "https":
            return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=_TIMEOUT_S)
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=_TIMEOUT_S)


def _message(raw: bytes, reason: str, url: str) -> str:
    """The error's message; a bare 404 most likely means the public listener was asked."""
    try:
        message = str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = reason
    if message == "Not Found":
        return f"Not Found (is {url} the admin listener, server.admin_bind?)"
    return message


def admin_client(url: str | None, config: Path | None, token: str | None) -> AdminClient:
    """The admin listener from the flags, the config's ``[server]`` or the environment; the
    token from ``--token``, ``$ENSEMBLE_OPS_SERVER__ADMIN_TOKEN`` or the config."""
    server = _server_section(config) if config is not None else None
    token = token or os.environ.get(f"{ENV_PREFIX}SERVER__ADMIN_TOKEN")
    if token is None and server is not None and server.admin_token is not None:
        token = server.admin_token.get_secret_value()
    if url is None:
        bind = os.environ.get(f"{ENV_PREFIX}SERVER__ADMIN_BIND", ServerSettings().admin_bind)
        if server is not None and "admin_bind" in server.model_fields_set:
            bind = server.admin_bind
        url = url_of(bind)
    return AdminClient(url, token)


def url_of(bind: str) -> str:
    """The URL a client on this host uses for an ``admin_bind``: a wildcard address is
    reached on loopback."""
    address = admin_address(bind)
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server_section(path: Path) -> ServerSettings:
    """Only ``[server]`` of a config file, validated; raises ``SystemExit`` with one line."""
    try:
        with path.open("rb") as handle:
            table = tomllib.load(handle).get("server", {})
        return ServerSettings.model_validate(table)
    except (OSError, tomllib.TOMLDecodeError, ValueError) as err:
        raise SystemExit(f"ensemble-ops: cannot read [server] from {path}: {err}") from None
