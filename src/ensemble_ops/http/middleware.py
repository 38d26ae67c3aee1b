"""ASGI middleware: request context and log line, and the request body limit.

Both are plain ASGI (not ``BaseHTTPMiddleware``) so streaming responses pass through
untouched and the request line is written when the last byte has been sent.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.trace import NoOpTracer, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimitMiddleware", "RequestContextMiddleware", "log_fields", "response_headers"]

_log = structlog.get_logger("ensemble_ops.request")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


_FIELDS = "ensemble_ops.log_fields"
_HEADERS = "ensemble_ops.response_headers"
_PROPAGATOR = TraceContextTextMapPropagator()


def log_fields(scope: Scope) -> dict[str, Any]:
    """The dict a route fills with fields for this request's log line (model, tokens...).

    It lives in the request's own scope, not in ``scope["state"]``: servers may share that
    one (it starts as a shallow copy of the lifespan state).
    """
    fields: dict[str, Any] = scope.setdefault(_FIELDS, {})
    return fields


def response_headers(scope: Scope) -> dict[str, str]:
    """Headers a route wants on this request's response whatever it becomes (an answer or
    an error): a key's rate-limit quotas."""
    headers: dict[str, str] = scope.setdefault(_HEADERS, {})
    return headers


class RequestContextMiddleware:
    """Gives each request an id (``X-Request-ID`` honoured when sane, else a new one),
    binds it to the log context, returns it as a header, and logs one line per request.

    It also opens the request's SERVER span (a no-op one when tracing is off): an incoming
    W3C ``traceparent`` makes it part of the caller's trace, and the response names the trace
    in a ``traceresponse`` header (Trace Context Level 2).
    """

    def __init__(self, app: ASGIApp, tracer: Tracer | None = None) -> None:
        self.app = app
        self.tracer = tracer or NoOpTracer()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        fields = scope[_FIELDS] = {}
        started = time.perf_counter()
        status = 500
        parent = _PROPAGATOR.extract(
            {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}
        )
        method, path = scope["method"], scope["path"]
        span = self.tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                outgoing = MutableHeaders(scope=message)
                outgoing.append("X-Request-ID", request_id)
                # Time spent in the app until the answer starts (W3C Server-Timing).
                elapsed_ms = (time.perf_counter() - started) * 1000
                outgoing.append("Server-Timing", f"app;dur={elapsed_ms:.2f}")
                for name, value in scope.get(_HEADERS, {}).items():
                    if name not in outgoing:
                        outgoing.append(name, value)
                context = span.get_span_context()
                if context.is_valid:
                    flags = f"{int(context.trace_flags):02x}"
                    outgoing.append(
                        "traceresponse",
                        f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags}",
                    )
            await send(message)

        with (
            trace.use_span(span, end_on_exit=True),
            structlog.contextvars.bound_contextvars(request_id=request_id),
        ):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                route = scope.get("route")
                template = getattr(route, "path", None)
                if template:  # the route's template keeps span names few: /admin/models/{model}
                    span.update_name(f"{method} {template}")
                    span.set_attribute("http.route", template)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                quiet = path.startswith(("/health/", "/metrics"))
                log = _log.debug if quiet and status < 400 else _log.info
                log(
                    "request",
                    method=method,
                    path=path,
                    status=status,
                    latency_ms=round((time.perf_counter() - started) * 1000, 2),
                    **fields,
                )


class _BodyTooLargeError(Exception):
    pass


class BodyLimitMiddleware:
    """Answers 413 when a request body exceeds ``max_bytes``, by header or by counting."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLargeError:
            if started:
                raise
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        from ensemble_ops.http.errors import (
            error_response,  # the one place HTTP errors are rendered
        )

        response = error_response(
            413,
            f"The request body is larger than the limit of {self.max_bytes} bytes.",
            error_type="invalid_request_error",
            code="request_too_large",
        )
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": response.raw_headers,
            }
        )
        await send({"type": "http.response.body", "body": response.body})
