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

import itertools
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ensemble_ops.errors import ConfigError

__all__ = [
    "GATES",
    "CacheSettings",
    "GateSpec",
    "HealthSettings",
    "LoggingSettings",
    "MetricsSettings",
    "ModeName",
    "ModeSpec",
    "ModelSpec",
    "ReloadSettings",
    "RolloutKind",
    "RolloutSpec",
    "ServerSettings",
    "Settings",
    "SplitSpec",
    "TracingSettings",
]

ModeName = Literal["fast", "balanced", "creative"]
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""What a member's name, and a split's, may be: it is a ``model`` in requests and a label."""
_REDIS_SCHEMES = ("redis", "rediss", "unix")
ENV_PREFIX = "ENSEMBLE_OPS_"


class _Section(BaseModel):
    # strict: TOML already gives typed values; "8000" for a port is a mistake worth naming.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ServerSettings(_Section):
    """Where and how the HTTP server listens."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    admin_token: SecretStr | None = None
    max_body_bytes: Annotated[int, Field(gt=0)] = 1024 * 1024
    shutdown_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """After the drain delay: how long in-flight requests may take to finish."""
    drain_delay_s: Annotated[float, Field(ge=0)] = 5.0
    """On SIGTERM readiness fails at once and the server keeps serving this long, so load
    balancers take it out before it stops accepting (0 on a second signal or Ctrl-C)."""
    access_log: bool = True


class LoggingSettings(_Section):
    """Structured logs: JSON lines by default, ``console`` for humans."""

    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    file: Annotated[Path, Field(strict=False)] | None = None


class CacheSettings(_Section):
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


class HealthSettings(_Section):
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


class MetricsSettings(_Section):
    """Prometheus metrics; disabled: /metrics and /health/metrics answer 404."""

    enabled: bool = True


class TracingSettings(_Section):
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


RolloutKind = Literal["switch", "canary", "shadow", "blue_green"]
GATES = ("error_rate", "p95_latency", "ttft", "empty_share")
"""The gates a canary or shadow rollout judges, each new copy against old."""


class GateSpec(_Section):
    """Limits the new copy must keep, each judged against the old copy over the same window."""

    max_error_rate: Annotated[float, Field(ge=0, le=1, strict=False)] = 0.05
    """At most this share of the new copy's requests may fail..."""
    max_error_rate_increase: Annotated[float, Field(ge=0, le=1, strict=False)] = 0.01
    """...and at most this much more than the old copy's share (1 point)."""
    max_p95_ratio: Annotated[float, Field(gt=0, strict=False)] = 1.5
    """The new copy's p95 latency over the old copy's."""
    max_ttft_ratio: Annotated[float, Field(gt=0, strict=False)] = 1.5
    """The new copy's p95 time to first token over the old copy's."""
    max_empty_share: Annotated[float, Field(ge=0, le=1, strict=False)] | None = None
    """The share of empty answers allowed; unset: the old copy's share + 5 points."""


class RolloutSpec(_Section):
    """How a reload hands traffic to the new copy (``[reload.rollout]``, or the reload
    request's fields). ``switch``: all at once after warm-up; ``canary``: step by step while
    gates compare both copies; ``shadow``: mirror a share and judge the same gates, then go on
    to ``after_shadow``; ``blue_green``: keep both until promoted or aborted."""

    kind: RolloutKind = "switch"
    steps: Annotated[tuple[float, ...], Field(min_length=1, strict=False)] = (5.0, 25.0, 50.0)
    """The new copy's share of requests (percent) at each canary step, each under 100: the
    last step passing switches all traffic."""
    min_requests: Annotated[int, Field(ge=1)] = 20
    """Each step holds until the new copy answered at least this many requests..."""
    min_seconds: Annotated[float, Field(ge=0, strict=False)] = 30.0
    """...and for at least this long."""
    gates: GateSpec = GateSpec()
    failure_budget: Annotated[int, Field(ge=1)] = 2
    """Consecutive failed checks of a gate before the rollout rolls back."""
    deadline_s: Annotated[float, Field(gt=0, strict=False)] = 1800.0
    """A rollout still undecided after this long rolls back."""
    shadow_percent: Annotated[float, Field(gt=0, le=100, strict=False)] = 10.0
    """The share of requests mirrored to the new copy in a shadow rollout."""
    after_shadow: Literal["switch", "canary"] = "switch"
    """Where a shadow rollout whose gates pass goes next."""
    promote_timeout_s: Annotated[float, Field(gt=0, strict=False)] = 3600.0
    """A blue-green rollout not promoted within this long rolls back."""

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < step < 100 for step in steps):
            raise ValueError("each step must be a percentage in (0, 100); 100 is implied")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must increase")
        return steps


class ReloadSettings(_Section):
    """Zero-downtime reload: warm-up, drain and safety limits."""

    model_dir: Annotated[Path, Field(strict=False)] | None = None
    """Reload paths must resolve inside it; unset: the folders of the configured models."""
    warmup_iterations: Annotated[int, Field(ge=1, le=100)] = 3
    warmup_prompt: str = "Hello, how are you?"
    warmup_max_tokens: Annotated[int, Field(gt=0)] = 8
    warmup_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """One warm-up inference that takes longer fails the reload."""
    drain_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """Past it a slow drain is reported; the old copy still closes only when idle."""
    max_concurrent_loads: Annotated[int, Field(ge=1)] = 1
    memory_headroom: Annotated[float, Field(ge=1.0)] = 1.1
    """A second copy needs its size times this in free RAM (or VRAM)."""
    rollout: RolloutSpec = RolloutSpec()
    """How reloads hand traffic to the new copy unless the request says otherwise."""


class ModeSpec(_Section):
    """A request preset; explicit request fields override it."""

    max_tokens: Annotated[int, Field(gt=0)]
    temperature: Annotated[float, Field(ge=0, le=2)]
    top_p: Annotated[float, Field(gt=0, le=1)]
    prefer: Annotated[tuple[str, ...], Field(strict=False)] = ()
    """Members tried first, in order, for ``model: "ensemble"``; the rest follow."""


_DEFAULT_MODES: dict[ModeName, ModeSpec] = {
    "fast": ModeSpec(max_tokens=64, temperature=0.2, top_p=0.9),
    "balanced": ModeSpec(max_tokens=128, temperature=0.7, top_p=0.95),
    "creative": ModeSpec(max_tokens=256, temperature=1.0, top_p=1.0),
}


class ModelSpec(_Section):
    """One ensemble member: a GGUF file and how llama.cpp runs it."""

    name: Annotated[str, Field(pattern=_NAME_PATTERN)]
    optional: bool = False
    """An optional member whose file is missing at start-up is reported unhealthy (and can
    be reloaded later) instead of stopping start-up. Declared before ``path``: its check
    reads it."""
    path: Annotated[Path, Field(strict=False)]
    n_ctx: Annotated[int, Field(ge=16)] = 4096
    n_gpu_layers: Annotated[int, Field(ge=-1)] = 0
    """-1 offloads every layer (needs a CUDA build of llama-cpp-python)."""
    n_threads: Annotated[int, Field(gt=0)] | None = None
    """CPU threads for generation; llama.cpp's default when unset."""
    n_batch: Annotated[int, Field(gt=0)] = 512
    """Tokens per decode step, all sequences together (prompt chunks included)."""
    parallel: Annotated[int, Field(ge=1, le=256)] = 4
    """Sequences decoded together in one batch; the KV cache holds n_ctx x parallel."""
    queue_size: Annotated[int, Field(ge=0)] = 16
    """Requests that may wait for this member beyond those it runs; past it: 503."""
    description: str = ""
    reload_strategy: Literal["side_by_side", "replace"] = "side_by_side"
    """side_by_side loads the new copy next to the old one and fails the reload when memory
    for two is short; replace then unloads the old copy first (the others serve meanwhile)."""
    warmup_prompt: str | None = None
    """Overrides reload.warmup_prompt for this member."""
    warmup_iterations: Annotated[int, Field(ge=1, le=100)] | None = None

    @field_validator("path")
    @classmethod
    def _file_exists(cls, path: Path, info: ValidationInfo) -> Path:
        if not path.is_file() and not info.data.get("optional", False):
            raise ValueError(
                f"GGUF file not found: {path} (optional = true would start without it)"
            )
        return path


class SplitSpec(_Section):
    """A model name of its own that shares requests among members by weight (A/B testing).

    Each request goes to one member, picked by its session key (the same key always gets
    the same member) in proportion to the weights; the others answer, by weight, when that
    one cannot. Weights are relative: ``{a = 70, b = 30}`` and ``{a = 7, b = 3}`` are alike.
    """

    weights: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]]
    """Member name -> its relative share of the split's sessions."""

    @field_validator("weights")
    @classmethod
    def _two_members(cls, weights: dict[str, float]) -> dict[str, float]:
        if len(weights) < 2:
            raise ValueError(f"a split needs at least two members, not {len(weights)}")
        return weights


class Settings(_Section):
    """Everything the service needs; build it with :meth:`from_toml` or :meth:`from_mapping`."""

    server: ServerSettings = ServerSettings()
    logging: LoggingSettings = LoggingSettings()
    cache: CacheSettings = CacheSettings()
    health: HealthSettings = HealthSettings()
    reload: ReloadSettings = ReloadSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    modes: dict[ModeName, ModeSpec] = Field(default_factory=lambda: dict(_DEFAULT_MODES))
    default_mode: ModeName = "balanced"
    models: Annotated[tuple[ModelSpec, ...], Field(min_length=1, strict=False)]
    splits: dict[Annotated[str, Field(pattern=_NAME_PATTERN)], SplitSpec] = Field(
        default_factory=dict
    )
    """Virtual model names that share their requests among members by weight."""

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
        modes = merged.get("modes")
        if isinstance(modes, dict):
            # A config that tunes one key of one mode keeps every other default.
            merged["modes"] = {
                name: _merge_mode(name, modes.get(name)) for name in {**_DEFAULT_MODES, **modes}
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


def _merge_mode(name: str, override: Any) -> Any:
    """A mode's preset with ``override``'s keys on top (unknown names are left to fail)."""
    default = next((spec for mode, spec in _DEFAULT_MODES.items() if mode == name), None)
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
