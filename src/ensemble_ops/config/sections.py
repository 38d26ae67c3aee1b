"""The service's own sections: server, logging, cache, health, metrics, tracing."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from ensemble_ops.config.base import Section

__all__ = [
    "CacheSettings",
    "HealthSettings",
    "LoggingSettings",
    "MetricsSettings",
    "ServerSettings",
    "TracingSettings",
    "admin_address",
    "is_loopback",
]

_REDIS_SCHEMES = ("redis", "rediss", "unix")


class ServerSettings(Section):
    """Where and how the HTTP server listens."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    admin_bind: Annotated[str, Field(min_length=1)] = "127.0.0.1:8001"
    """The admin listener: ``host:port`` (port 0: a free one, logged at start) or
    ``unix:/path`` (a Unix socket). Admin routes answer there only, never on the public
    listener, so no proxy in front of that one can open them. A non-loopback address needs
    ``admin_token``."""
    admin_token: SecretStr | None = None
    """Bearer token every admin request needs when set (never logged)."""
    max_body_bytes: Annotated[int, Field(gt=0)] = 1024 * 1024
    shutdown_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """After the drain delay: how long in-flight requests may take to finish."""
    drain_delay_s: Annotated[float, Field(ge=0)] = 5.0
    """On SIGTERM readiness fails at once and the server keeps serving this long, so load
    balancers take it out before it stops accepting (0 on a second signal or Ctrl-C)."""
    access_log: bool = True
    events_heartbeat_s: Annotated[float, Field(gt=0)] = 15.0
    """A comment line on every open ``GET /events`` stream this often, so proxies with an
    idle timeout keep it open."""
    compute_threads: Annotated[int, Field(ge=1)] | None = None
    """The threads every member's decode steps share (never more busy at once); unset: the
    cores this process may use (its CPU affinity, capped by the cgroup's CPU quota)."""


class LoggingSettings(Section):
    """Structured logs: JSON lines by default, ``console`` for humans."""

    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    file: Annotated[Path, Field(strict=False)] | None = None


class CacheSettings(Section):
    """Response cache for deterministic requests (temperature 0 or a fixed seed): in this
    process's memory, or in Redis shared by replicas."""

    enabled: bool = True
    backend: Literal["memory", "redis"] = "memory"
    url: Annotated[SecretStr | None, Field(validate_default=True)] = None
    """``redis://[:password@]host:port/db`` (or ``rediss://``); required for ``redis``.
    Secret: it may hold a password, so it is never logged."""
    max_entries: Annotated[int, Field(gt=0)] = 1024
    """The in-memory backend's bound (least recently used go first)."""
    ttl_s: Annotated[float, Field(gt=0)] = 300.0
    timeout_s: Annotated[float, Field(gt=0)] = 0.05
    """One Redis operation that takes longer is given up: the engine answers instead."""
    namespace: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")] = "ensemble-ops"
    """Prefix of every Redis key, so several deployments can share one Redis."""
    max_value_bytes: Annotated[int, Field(gt=0)] = 1024 * 1024
    """Answers larger than this (serialised) are not stored."""
    lock_ttl_s: Annotated[float, Field(gt=0)] = 30.0
    """How long a replica's claim to generate an answer lasts at most (it frees it sooner)."""
    lock_wait_s: Annotated[float, Field(ge=0)] = 10.0
    """How long another replica waits for that answer before generating it itself."""
    digest_file: Annotated[Path, Field(strict=False)] | None = None
    """Where the GGUF content digests are remembered by path, size and mtime, so a large
    file is hashed once; ``$XDG_CACHE_HOME/ensemble-ops/digests.json`` when unset."""

    @field_validator("url")
    @classmethod
    def _url_for_redis(cls, url: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if url is None and info.data.get("backend") == "redis":
            raise ValueError('required when backend = "redis" (redis://host:6379/0)')
        if url is None:
            return url
        text = url.get_secret_value()
        if text.split("://")[0] not in _REDIS_SCHEMES:
            raise ValueError("must start with redis://, rediss:// or unix://")
        try:
            urlsplit(text).port  # noqa: B018 (parsing it is the check)
        except ValueError:
            raise ValueError("the port is not a number") from None  # never the URL: a secret
        return url


class HealthSettings(Section):
    """Thresholds of the tri-state model health and of the liveness watchdog."""

    memory_limit_bytes: Annotated[int, Field(gt=0)] = 30 * 10**9
    """A member whose llama.cpp memory (weights + context) exceeds this is degraded."""
    latency_limit_s: Annotated[float, Field(gt=0)] = 5.0
    """A member whose last inference probe took longer than this is degraded."""
    time_per_token_limit_s: Annotated[float, Field(gt=0)] = 0.5
    """A member whose last answer took longer than this per output token (after the first)
    is degraded: judged per token, so a long answer is never slow by its length alone."""
    failure_threshold: Annotated[int, Field(gt=0)] = 3
    """This many engine failures in a row make a member unhealthy."""
    probe_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    probe_cache_ttl_s: Annotated[float, Field(ge=0)] = 5.0
    probe_prompt: str = "Health check."
    loop_lag_limit_s: Annotated[float, Field(gt=0)] = 5.0
    """Liveness fails while the event loop lagged more than this in the last window."""
    loop_lag_window_s: Annotated[float, Field(gt=0)] = 30.0
    inference_hard_limit_s: Annotated[float, Field(gt=0)] = 600.0
    """An inference running longer than this means a stuck worker: liveness fails."""
    lease_hard_limit_s: Annotated[float, Field(gt=0)] = 900.0
    """A request holding a member longer than this means a deadlock: liveness fails."""
    watchdog_interval_s: Annotated[float, Field(gt=0)] = 0.5


class MetricsSettings(Section):
    """Prometheus metrics; disabled: /metrics and /health/metrics answer 404."""

    enabled: bool = True


class TracingSettings(Section):
    """OpenTelemetry traces (OTLP over HTTP/protobuf), off unless asked for.

    On with ``enabled = true`` or when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; ``OTEL_SDK_DISABLED=true`` turns it off whatever
    else says. The SDK reads the other ``OTEL_*`` variables itself (service name, resource
    attributes, headers, batch sizes).
    """

    enabled: bool = False
    endpoint: str | None = None
    """Where spans go (the full traces URL); from the OTEL_* variables when unset."""
    sdk_disabled: bool = False
    """``OTEL_SDK_DISABLED``."""
    capture_content: bool = False
    """Record prompts and answers on spans (gen_ai.input/output.messages): off by default,
    they may hold personal data."""

    @property
    def active(self) -> bool:
        return not self.sdk_disabled and (self.enabled or self.endpoint is not None)


def admin_address(bind: str) -> tuple[str, int] | str:
    """``admin_bind`` parsed: ``(host, port)``, or the socket path of ``unix:/path``;
    raises ``ValueError`` saying what is wrong."""
    if bind.startswith("unix:"):
        path = bind.removeprefix("unix:")
        if not path:
            raise ValueError("unix: needs a socket path, as in unix:/run/ensemble-ops/admin.sock")
        return path
    host, sep, port = bind.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port or unix:/path, not {bind!r}")
    host = host.removeprefix("[").removesuffix("]")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"the port of {bind!r} is not a port number")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
