"""Settings: one validated object from a TOML file plus ``ENSEMBLE_OPS_*`` overrides.

Every value has a typed default with its unit in the name. Anything wrong (an unknown key,
a wrong type, a missing GGUF file, a duplicate model name) raises :class:`ConfigError` with
one line that names the key, so start-up fails before any model is loaded.

Environment overrides use ``__`` between levels, and models are addressed by name::

    ENSEMBLE_OPS_SERVER__PORT=9000
    ENSEMBLE_OPS_SERVER__ADMIN_TOKEN=...
    ENSEMBLE_OPS_MODELS__QWEN__N_GPU_LAYERS=0

Values are read as TOML literals (``9000``, ``true``, ``["a", "b"]``) and as plain strings
otherwise.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import Field, ValidationError, model_validator

from ensemble_ops.config.access import AuthSettings
from ensemble_ops.config.base import NAME_PATTERN, Section
from ensemble_ops.config.golden import GoldenSetError, load_golden_set
from ensemble_ops.config.members import DEFAULT_MODES, ModelSpec, ModeName, ModeSpec, SplitSpec
from ensemble_ops.config.quality import QualitySettings
from ensemble_ops.config.rollout import ReloadSettings
from ensemble_ops.config.sections import (
    CacheSettings,
    HealthSettings,
    LoggingSettings,
    MetricsSettings,
    ServerSettings,
    TracingSettings,
    admin_address,
    is_loopback,
)
from ensemble_ops.errors import ConfigError

__all__ = ["ENV_PREFIX", "Settings"]

ENV_PREFIX = "ENSEMBLE_OPS_"


class Settings(Section):
    """Everything the service needs; build it with :meth:`from_toml` or :meth:`from_mapping`."""

    server: ServerSettings = ServerSettings()
    logging: LoggingSettings = LoggingSettings()
    cache: CacheSettings = CacheSettings()
    health: HealthSettings = HealthSettings()
    reload: ReloadSettings = ReloadSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    auth: AuthSettings = AuthSettings()
    quality: QualitySettings = QualitySettings()
    modes: dict[ModeName, ModeSpec] = Field(default_factory=lambda: dict(DEFAULT_MODES))
    default_mode: ModeName = "balanced"
    models: Annotated[tuple[ModelSpec, ...], Field(min_length=1, strict=False)]
    splits: dict[Annotated[str, Field(pattern=NAME_PATTERN)], SplitSpec] = Field(
        default_factory=dict
    )
    """Virtual model names that share their requests among members by weight."""

    @model_validator(mode="after")
    def _admin_is_safe(self) -> Self:
        """An admin listener reachable from other hosts must need a token."""
        try:
            address = admin_address(self.server.admin_bind)
        except ValueError as err:
            raise ValueError(f"server.admin_bind: {err}") from None
        if (
            isinstance(address, tuple)
            and not is_loopback(address[0])
            and self.server.admin_token is None
        ):
            raise ValueError(
                f"server.admin_bind: {self.server.admin_bind} is reachable from other hosts; "
                "set server.admin_token (or bind to loopback or a unix: socket)"
            )
        if isinstance(address, tuple) and address[1] != 0 and address[1] == self.server.port:
            raise ValueError(
                f"server.admin_bind: port {address[1]} is the public port; the admin "
                "listener needs a port (or a unix: socket) of its own"
            )
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [m.name for m in self.models]
        for i, name in enumerate(names):
            if name == "ensemble":
                raise ValueError(f"models[{i}].name: 'ensemble' is reserved for routing")
            if name in names[:i]:
                raise ValueError(f"models[{i}].name: duplicate model name {name!r}")
        for mode, spec in self.modes.items():
            for member in spec.prefer:
                if member not in names:
                    raise ValueError(f"modes.{mode}.prefer: unknown model {member!r}")
        for split, shares in self.splits.items():
            if split == "ensemble":
                raise ValueError(f"splits.{split}: 'ensemble' is reserved for routing")
            if split in names:
                raise ValueError(f"splits.{split}: a model is already named {split!r}")
            for member in shares.weights:
                if member not in names:
                    raise ValueError(f"splits.{split}.weights: unknown model {member!r}")
        known = {"ensemble", *names, *self.splits}
        for i, key in enumerate(self.auth.keys):
            for model in key.models or ():
                if model not in known:
                    raise ValueError(f"auth.keys[{i}].models: unknown model {model!r}")
        return self

    @model_validator(mode="after")
    def _golden_sets_load(self) -> Self:
        """Every golden set in use parses: a bad line stops start-up, not a reload later."""
        where = {
            f"models[{i}].quality.golden_set": m.quality.golden_set
            for i, m in enumerate(self.models)
        }
        where["quality.golden_set"] = self.quality.golden_set
        for key, path in where.items():
            if path is not None:
                try:
                    load_golden_set(path)
                except GoldenSetError as err:
                    raise ValueError(f"{key}: {err}") from None
        return self

    def model(self, name: str) -> ModelSpec:
        """The spec of member ``name`` (KeyError when there is none)."""
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        *,
        base_dir: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Validate ``data`` (as read from TOML) after applying environment overrides.

        Relative model paths are resolved against ``base_dir`` (the config file's folder).
        """
        env = os.environ if environ is None else environ
        merged = _apply_environment(_to_plain(data), env)
        _apply_otel_environment(merged, env)
        base = base_dir or Path.cwd()
        models = merged.get("models")
        if isinstance(models, list):
            for entry in models:
                if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                    entry["path"] = base / Path(entry["path"]).expanduser()
                if isinstance(entry, dict):
                    _resolve_golden_set(entry.get("quality"), base)
        _resolve_golden_set(merged.get("quality"), base)
        modes = merged.get("modes")
        if isinstance(modes, dict):
            # A config that tunes one key of one mode keeps every other default.
            merged["modes"] = {
                name: _merge_mode(name, modes.get(name)) for name in {**DEFAULT_MODES, **modes}
            }
        try:
            return cls.model_validate(merged)
        except ValidationError as err:
            raise ConfigError(_first_problem(err)) from err

    @classmethod
    def from_toml(cls, path: Path, *, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate a TOML config file."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from err
        return cls.from_mapping(data, base_dir=path.resolve().parent, environ=environ)


def _resolve_golden_set(table: Any, base: Path) -> None:
    """A relative ``golden_set`` is relative to the config file, like a model's path."""
    if isinstance(table, dict) and isinstance(table.get("golden_set"), str):
        table["golden_set"] = base / Path(table["golden_set"]).expanduser()


def _merge_mode(name: str, override: Any) -> Any:
    """A mode's preset with ``override``'s keys on top (unknown names are left to fail)."""
    default = next((spec for mode, spec in DEFAULT_MODES.items() if mode == name), None)
    if default is None or override is None:
        return override if default is None else default
    if not isinstance(override, dict):
        return override
    return {**default.model_dump(), **override}


def _to_plain(value: Any) -> Any:
    """Deep-copy TOML data into dicts and lists we may change."""
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    return value


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        value = _parse_env_value(raw)
        if parts[0] == "models" and len(parts) == 3:
            name, field = parts[1], parts[2]
            entries = data.get("models", [])
            match = [m for m in entries if str(m.get("name", "")).lower() == name]
            if not match:
                raise ConfigError(f"{key}: no model named {name!r} in the config")
            match[0][field] = value
            continue
        target = data
        for part in parts[:-1]:
            nested = target.setdefault(part, {})
            if not isinstance(nested, dict):
                raise ConfigError(f"{key}: {'.'.join(parts[:-1])} is not a table")
            target = nested
        target[parts[-1]] = value
    return data


def _apply_otel_environment(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """The standard OpenTelemetry variables that decide whether and where traces go."""
    tracing = data.setdefault("tracing", {})
    if not isinstance(tracing, dict):
        return  # not a table: validation names it
    traces = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if "endpoint" not in tracing and (traces or base):
        # The OTLP/HTTP rule: the general endpoint gets the signal's path appended.
        tracing["endpoint"] = traces or base.rstrip("/") + "/v1/traces"
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        tracing["sdk_disabled"] = True


def _first_problem(err: ValidationError) -> str:
    """One line: the dotted key and the reason, for the first (and usually only) problem."""
    problem = err.errors()[0]
    loc = problem["loc"]
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    reason = str(problem["msg"]).removeprefix("Value error, ")
    if problem["type"] == "extra_forbidden":
        reason = "unknown key"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{key}: {reason}{extra}" if key else f"{reason}{extra}"
