"""The one place where errors become HTTP responses, in OpenAI's error body shape::

{"error": {"message": "...", "type": "...", "param": null, "code": "..."}}
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import (
    ContextLengthExceededError,
    EngineError,
    EnsembleOpsError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    NoMemberAvailableError,
    OverloadedError,
)
from .reload import ReloadConflictError

__all__ = ["EXCEPTION_HANDLERS", "error_response"]

_log = structlog.get_logger("ensemble_ops.errors")


def error_response(
    status: int,
    message: str,
    *,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
    retry_after_s: int | None = None,
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _render(err: EnsembleOpsError) -> JSONResponse:
    message = str(err)
    match err:
        case ContextLengthExceededError():
            return error_response(
                400,
                message,
                error_type="invalid_request_error",
                code="context_length_exceeded",
                param="messages",
            )
        case InvalidRequestError():
            return error_response(
                400,
                message,
                error_type="invalid_request_error",
                code="invalid_value",
                param=err.param,
            )
        case ModelNotFoundError():
            return error_response(
                404,
                message,
                error_type="invalid_request_error",
                code="model_not_found",
                param="model",
            )
        case OverloadedError() | NoMemberAvailableError() | ModelUnavailableError():
            code = "overloaded" if isinstance(err, OverloadedError) else "model_unavailable"
            return error_response(
                503,
                message,
                error_type="service_unavailable_error",
                code=code,
                retry_after_s=err.retry_after_s,
            )
        case EngineError():
            return error_response(500, message, error_type="server_error", code="engine_error")
    return error_response(500, message, error_type="server_error", code="internal_error")


async def _on_core_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EnsembleOpsError)
    response = _render(exc)
    if response.status_code >= 500:
        _log.warning("request.failed", error=str(exc), error_type=type(exc).__name__)
    return response


async def _on_reload_conflict(request: Request, exc: Exception) -> Response:
    from .reload import ReloadConflictError

    assert isinstance(exc, ReloadConflictError)
    error = {
        "message": str(exc),
        "type": "conflict_error",
        "param": None,
        "code": "reload_in_progress",
    }
    body = {"error": error, "status": exc.status.to_dict()}
    return JSONResponse(body, status_code=409, headers={"Retry-After": "5"})


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}
    auth = exc.status_code in (401, 403)
    error_type = "authentication_error" if auth else "invalid_request_error"
    code = codes.get(exc.status_code)
    response = error_response(exc.status_code, exc.detail, error_type=error_type, code=code)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    _log.exception("request.crashed", error=str(exc))
    return error_response(
        500, "Internal server error.", error_type="server_error", code="internal_error"
    )


EXCEPTION_HANDLERS: Mapping[
    type[Exception] | int, Callable[[Request, Exception], Awaitable[Response]]
] = {
    EnsembleOpsError: _on_core_error,
    ReloadConflictError: _on_reload_conflict,
    HTTPException: _on_http_error,
    Exception: _on_unexpected,
}
