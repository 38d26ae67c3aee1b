"""Metrics routes: Prometheus text at ``/metrics`` and ``/health/metrics``, flat JSON at
``/health/metrics/json``. Registered only when ``metrics.enabled`` (404 otherwise). With
``auth.protect_observability`` they need an API key (Prometheus scrapes with one)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ensemble_ops.http.auth import require_observer
from ensemble_ops.http.openapi import Answer, ApiRoute, errors
from ensemble_ops.observability.metrics import Metrics

__all__ = ["routes"]


def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def exposition(request: Request) -> Response:
    require_observer(request)
    accept = [v.strip() for v in request.headers.get("accept", "").split(",") if v.strip()]
    content, headers = _metrics(request).render(accept)
    return Response(content, headers=headers)


async def as_json(request: Request) -> Response:
    require_observer(request)
    return JSONResponse(_metrics(request).flat())


_EXPOSITION = {200: Answer("Prometheus text exposition.", text=True), **errors(401)}

routes = [
    ApiRoute(
        "/metrics", exposition, method="GET", summary="Prometheus metrics", responses=_EXPOSITION
    ),
    ApiRoute(
        "/health/metrics",
        exposition,
        method="GET",
        summary="Prometheus metrics",
        responses=_EXPOSITION,
    ),
    ApiRoute(
        "/health/metrics/json",
        as_json,
        method="GET",
        summary="The metrics as flat JSON",
        responses={200: Answer("name_labels: value.", dict[str, float | str]), **errors(401)},
    ),
]
