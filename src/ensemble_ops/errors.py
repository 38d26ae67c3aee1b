"""Errors of the core. Each builds its message in ``__init__``; HTTP codes live in the app."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ConfigError",
    "ContextLengthExceededError",
    "EngineError",
    "EnsembleOpsError",
    "InvalidModelFileError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "NoMemberAvailableError",
    "OverloadedError",
]


class EnsembleOpsError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(EnsembleOpsError):
    """The configuration is invalid; the message is one line naming the key."""


class InvalidRequestError(EnsembleOpsError):
    """A request body or parameter is malformed or out of range."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class ContextLengthExceededError(InvalidRequestError):
    """The prompt plus ``max_tokens`` does not fit the member's context window."""

    def __init__(self, model: str, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        self.model = model
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens; the request has "
            f"{prompt_tokens} prompt tokens and asks for {max_tokens} completion tokens "
            f"({prompt_tokens + max_tokens} in all). Shorten the prompt or lower max_tokens.",
            param="max_tokens",
        )


class ModelNotFoundError(EnsembleOpsError):
    """No member has this name."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        choices = ", ".join(["ensemble", *known])
        super().__init__(f"The model {name!r} does not exist; choose one of: {choices}.")


class ModelUnavailableError(EnsembleOpsError):
    """The member exists but cannot serve now (loading, failed to load, shutting down)."""

    retry_after_s = 5

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"The model {name!r} cannot serve right now: {reason}.")


class OverloadedError(EnsembleOpsError):
    """The member's queue is full; the client should retry later."""

    retry_after_s = 1

    def __init__(self, name: str, queue_size: int) -> None:
        self.name = name
        super().__init__(
            f"The model {name!r} is overloaded ({queue_size} requests already waiting); "
            "retry later."
        )


class NoMemberAvailableError(EnsembleOpsError):
    """Routing found no member that could serve: each was busy, loading or failed."""

    retry_after_s = 1

    def __init__(self, reasons: dict[str, str]) -> None:
        self.reasons = reasons
        detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        super().__init__(f"No ensemble member can serve this request right now ({detail}).")


class EngineError(EnsembleOpsError):
    """The inference engine failed while generating."""

    def __init__(self, model: str, message: str) -> None:
        self.model = model
        super().__init__(f"Inference failed on model {model!r}: {message}")


class InvalidModelFileError(EnsembleOpsError):
    """A GGUF file is missing, unreadable, or one llama.cpp cannot safely run."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")
