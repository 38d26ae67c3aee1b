"""Errors of the core, each carrying how it is reported: one table for HTTP and metrics.

Each class builds its message in ``__init__`` and declares its HTTP ``status``, its OpenAI
error ``error_type``, its ``code`` (also the ``error_type`` label of ``llm_errors_total``
and of the events), the ``param`` it concerns and, for 503s, ``retry_after_s``. The HTTP
layer renders them in one place and adds nothing of its own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

__all__ = [
    "ConfigError",
    "ContextLengthExceededError",
    "DeadlineUnreachableError",
    "EngineError",
    "EnsembleOpsError",
    "InvalidApiKeyError",
    "InvalidModelFileError",
    "InvalidRequestError",
    "ModelNotAllowedError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "NoMemberAvailableError",
    "OverloadedError",
    "ParallelLimitError",
    "RateLimitError",
    "ReloadConflictError",
    "RequestsLimitError",
    "TokensLimitError",
    "error_code",
]


class EnsembleOpsError(Exception):
    """Base of every error this package raises on purpose."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"
    retry_after_s: int | None = None
    param: str | None = None
    headers: ClassVar[dict[str, str]] = {}
    """Response headers this error always carries."""

    def response_headers(self) -> dict[str, str]:
        """The headers of the response that renders this error."""
        return dict(self.headers)


class ConfigError(EnsembleOpsError):
    """The configuration is invalid; the message is one line naming the key."""

    code = "config_error"


class InvalidRequestError(EnsembleOpsError):
    """A request body or parameter is malformed or out of range."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_value"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class ContextLengthExceededError(InvalidRequestError):
    """The prompt plus ``max_tokens`` does not fit the member's context window."""

    code = "context_length_exceeded"

    def __init__(self, model: str, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        self.model = model
        self.n_ctx = n_ctx
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens; the request has "
            f"{prompt_tokens} prompt tokens and asks for {max_tokens} completion tokens "
            f"({prompt_tokens + max_tokens} in all). Shorten the prompt or lower max_tokens.",
            param="max_tokens",
        )


class ModelNotFoundError(EnsembleOpsError):
    """No member has this name."""

    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"
    param = "model"

    def __init__(self, name: str, known: list[str], *, ensemble: bool = True) -> None:
        """``ensemble``: the choices include ``ensemble`` (inference; not a member's own
        endpoints)."""
        self.name = name
        choices = ", ".join(["ensemble", *known] if ensemble else known)
        super().__init__(f"The model {name!r} does not exist; choose one of: {choices}.")


class ModelUnavailableError(EnsembleOpsError):
    """The member exists but cannot serve now (loading, failed to load, shutting down)."""

    status = 503
    error_type = "service_unavailable_error"
    code = "model_unavailable"
    retry_after_s = 5

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"The model {name!r} cannot serve right now: {reason}.")


class OverloadedError(EnsembleOpsError):
    """The member's queue is full; the client should retry later (Retry-After: an estimate
    from the member's measured rate of answers)."""

    status = 503
    error_type = "service_unavailable_error"
    code = "overloaded"

    def __init__(self, name: str, queue_size: int, *, retry_after_s: int = 1) -> None:
        self.name = name
        self.retry_after_s = retry_after_s
        super().__init__(
            f"The model {name!r} is overloaded ({queue_size} requests already waiting); "
            f"retry in {retry_after_s} s."
        )


class DeadlineUnreachableError(OverloadedError):
    """The member could not even start the request before its latency target (estimated
    from the requests ahead of it and its measured rate): a 503 now, not a late answer."""

    code = "deadline_unreachable"

    def __init__(self, name: str, target_s: float, wait_s: float) -> None:
        self.name = name
        self.retry_after_s = max(1, math.ceil(wait_s - target_s))
        EnsembleOpsError.__init__(
            self,
            f"The model {name!r} cannot start this request within its latency target of "
            f"{target_s:g} s (about {wait_s:.1f} s of work is ahead of it); retry in "
            f"{self.retry_after_s} s.",
        )


class NoMemberAvailableError(EnsembleOpsError):
    """Routing found no member that could serve: each was busy, loading or failed."""

    status = 503
    error_type = "service_unavailable_error"
    code = "no_member_available"
    retry_after_s = 1

    def __init__(self, reasons: dict[str, str]) -> None:
        self.reasons = reasons
        detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        super().__init__(f"No ensemble member can serve this request right now ({detail}).")


class InvalidApiKeyError(EnsembleOpsError):
    """No API key, or one that is not configured (the key itself is never repeated)."""

    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="ensemble-ops"'}

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"{reason} Send your key as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'."
        )


class ModelNotAllowedError(EnsembleOpsError):
    """The caller's key does not allow this model."""

    status = 403
    error_type = "invalid_request_error"
    code = "model_not_allowed"
    param = "model"

    def __init__(self, key: str, model: str, allowed: tuple[str, ...]) -> None:
        super().__init__(
            f"The key {key!r} may not use the model {model!r}; it may use: {', '.join(allowed)}."
        )


class RateLimitError(EnsembleOpsError):
    """A key's limit refused the request; retry after ``retry_after_s`` (HTTP 429)."""

    status = 429
    code = "rate_limit_exceeded"
    limit = ""
    """``requests``, ``tokens`` or ``parallel``."""

    def __init__(
        self, key: str, what: str, retry_after_s: float, quotas: dict[str, str] | None = None
    ) -> None:
        """``quotas``: the caller's ``x-ratelimit-*`` headers, sent with the 429 too."""
        self.key = key
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        self._quotas = dict(quotas or {})
        super().__init__(
            f"Rate limit reached for key {key!r} on {what}; retry in {self.retry_after_s} s."
        )

    def response_headers(self) -> dict[str, str]:
        return {**self.headers, **self._quotas}


class RequestsLimitError(RateLimitError):
    error_type = "requests"
    limit = "requests"

    def __init__(
        self, key: str, rpm: int, retry_after_s: float, quotas: dict[str, str] | None = None
    ) -> None:
        super().__init__(key, f"requests per minute (limit {rpm})", retry_after_s, quotas)


class TokensLimitError(RateLimitError):
    error_type = "tokens"
    limit = "tokens"

    def __init__(
        self, key: str, tpm: int, retry_after_s: float, quotas: dict[str, str] | None = None
    ) -> None:
        super().__init__(key, f"tokens per minute (limit {tpm})", retry_after_s, quotas)


class ParallelLimitError(RateLimitError):
    error_type = "requests"
    code = "parallel_limit_exceeded"
    limit = "parallel"

    def __init__(self, key: str, max_parallel: int, quotas: dict[str, str] | None = None) -> None:
        super().__init__(key, f"requests in flight (limit {max_parallel})", 1.0, quotas)


class EngineError(EnsembleOpsError):
    """The inference engine failed while generating."""

    code = "engine_error"

    def __init__(self, model: str, message: str) -> None:
        self.model = model
        super().__init__(f"Inference failed on model {model!r}: {message}")


class InvalidModelFileError(EnsembleOpsError):
    """A GGUF file is missing, unreadable, or one llama.cpp cannot safely run."""

    code = "invalid_model_file"

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ReloadConflictError(EnsembleOpsError):
    """A reload of this member is already running; one at a time (HTTP 409)."""

    status = 409
    error_type = "conflict_error"
    code = "reload_in_progress"
    retry_after_s = 5

    def __init__(self, model: str, state: str, progress_percent: float) -> None:
        self.model = model
        super().__init__(
            f"A reload of {model!r} is already running ({state}, {progress_percent:.0f}%)."
        )


def error_code(err: BaseException) -> str:
    """The ``error_type`` label of any failure: the error's code, or ``internal_error``."""
    return err.code if isinstance(err, EnsembleOpsError) else EnsembleOpsError.code
