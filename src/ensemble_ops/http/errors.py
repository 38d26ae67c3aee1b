"""The one place where errors become HTTP responses, in OpenAI's error body shape::

{"error": {"message": "...", "type": "...", "param": null, "code": "..."}}
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ensemble_ops.errors import EnsembleOpsError, ReloadConflictError

__all__ = ["EXCEPTION_HANDLERS", "error_response"]

_log = structlog.get_logger("ensemble_ops.errors")


def error_response(
    status_code: int,
    message: str,
    *,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
    retry_after_s: int | None = None,
    **extra: Any,
) -> JSONResponse:
    """OpenAI's error body; ``extra`` adds keys beside ``error`` (the 409's ``status``)."""
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    error = {"message": message, "type": error_type, "param": param, "code": code}
    return JSONResponse({"error": error, **extra}, status_code=status_code, headers=headers)


def _render(err: EnsembleOpsError, **extra: Any) -> JSONResponse:
    """Every core error the same way, from what the error itself carries."""
    response = error_response(
        err.status,
        str(err),
        error_type=err.error_type,
        code=err.code,
        param=err.param,
        retry_after_s=err.retry_after_s,
        **extra,
    )
    response.headers.update(err.response_headers())
    return response


async def _on_core_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EnsembleOpsError)
    response = _render(exc)
    if response.status_code >= 500:
        _log.warning("request.failed", error=str(exc), error_type=exc.code)
    return response


async def _on_reload_conflict(request: Request, exc: Exception) -> Response:
    """A 409 that also shows the running reload, so the client sees what it waits for."""
    from ensemble_ops.http.protocol import dump_reload_status

    assert isinstance(exc, ReloadConflictError)
    status = request.app.state.reload.get_reload_status(exc.model)
    return _render(exc, status=dump_reload_status(status))


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
