"""Who may call the inference API: API keys with their limits (``[[auth.keys]]``)."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import Field, field_validator, model_validator

from ensemble_ops.config.base import NAME_PATTERN, Section

__all__ = ["ApiKeySpec", "AuthSettings"]


class ApiKeySpec(Section):
    """One caller's key: its name (in metrics and logs), the key's SHA-256 (the key itself is
    never stored), and optional limits. ``ensemble-ops keys new NAME`` makes one."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    key_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """Lowercase hex SHA-256 of the key."""
    models: Annotated[tuple[str, ...], Field(strict=False)] | None = None
    """The model names it may ask for (``ensemble``, splits, members); unset: any."""
    rpm: Annotated[int, Field(gt=0)] | None = None
    """Requests per minute, refilled continuously (GCRA): a burst of a minute's worth at
    most, never twice the rate at a window's edge."""
    tpm: Annotated[int, Field(gt=0)] | None = None
    """Tokens per minute, prompt plus completion: admission reserves the prompt and
    ``max_tokens``, the end refunds what was not used."""
    max_parallel: Annotated[int, Field(gt=0)] | None = None
    """Requests in flight at once (on each replica)."""
    weight: Annotated[float, Field(gt=0, strict=False)] = 1.0
    """Its share when a member is saturated: waiting requests of different keys take turns
    in proportion to their weights (within the modes' priorities)."""

    @field_validator("key_sha256", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class AuthSettings(Section):
    """API keys on the inference surface; none configured: ``/v1/*`` is open, as before."""

    keys: Annotated[tuple[ApiKeySpec, ...], Field(strict=False)] = ()
    protect_observability: bool = False
    """Also require a key for ``/metrics``, ``/health/llm*``, ``/events`` and the status page
    (Prometheus then scrapes with one as its bearer token); ``/health/live``,
    ``/health/ready`` and ``/openapi.json`` stay open."""

    @field_validator("keys")
    @classmethod
    def _distinct(cls, keys: tuple[ApiKeySpec, ...]) -> tuple[ApiKeySpec, ...]:
        names = [key.name for key in keys]
        hashes = [key.key_sha256 for key in keys]
        for i, key in enumerate(keys):
            if key.name in names[:i]:
                raise ValueError(f"duplicate key name {key.name!r}")
            if key.key_sha256 in hashes[:i]:
                raise ValueError(f"key {key.name!r} has the same key_sha256 as another")
        return keys

    @model_validator(mode="after")
    def _something_opens_observability(self) -> Self:
        if self.protect_observability and not self.keys:
            raise ValueError(
                "protect_observability needs at least one [[auth.keys]] entry to open "
                "/metrics and /health/llm*"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.keys)
