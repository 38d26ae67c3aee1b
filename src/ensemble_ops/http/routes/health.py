"""Health routes: per-model and ensemble health, Kubernetes readiness and liveness.

They read state already in memory (no inference unless ``run_inference=true``), so they
answer in milliseconds while every model is busy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ensemble_ops.access.limits import Limits
from ensemble_ops.config import Settings
from ensemble_ops.errors import ModelNotFoundError
from ensemble_ops.health.checker import HealthChecker
from ensemble_ops.health.status import HealthStatus, ModelHealth, utc_now
from ensemble_ops.http.auth import require_observer
from ensemble_ops.http.openapi import Answer, ApiRoute, errors
from ensemble_ops.http.protocol import (
    CacheState,
    EnsembleHealth,
    EnsembleHealthQuery,
    KubeProbe,
    LimitsState,
    Liveness,
    ModelHealthQuery,
    Readiness,
    dump_model_health,
    parse_query,
)

__all__ = ["routes"]


def _checker(request: Request) -> HealthChecker:
    checker: HealthChecker = request.app.state.health
    return checker


async def model_health(request: Request) -> Response:
    require_observer(request)
    checker = _checker(request)
    query = parse_query(ModelHealthQuery, request.query_params)
    if query.model not in checker.slots:
        raise ModelNotFoundError(query.model, list(checker.slots), ensemble=False)
    health = await checker.check_model_health(query.model, query.run_inference == "true")
    return JSONResponse(
        dump_model_health(health), status_code=200 if health.status.serving else 503
    )


async def all_health(request: Request) -> Response:
    require_observer(request)
    checker = _checker(request)
    query = parse_query(EnsembleHealthQuery, request.query_params)
    results = await checker.check_all_models(query.run_inference == "true")
    cache = await request.app.state.ensemble.cache_health()
    limits = await _limits_state(request)
    counts = dict.fromkeys(HealthStatus, 0)
    for health in results.values():
        counts[health.status] += 1
    serving = counts[HealthStatus.HEALTHY] + counts[HealthStatus.DEGRADED]
    if counts[HealthStatus.HEALTHY] == len(results):
        overall = HealthStatus.HEALTHY
    elif serving:
        overall = HealthStatus.DEGRADED
    else:
        overall = HealthStatus.UNHEALTHY
    body = EnsembleHealth(
        status=overall,
        healthy_count=counts[HealthStatus.HEALTHY],
        degraded_count=counts[HealthStatus.DEGRADED],
        unhealthy_count=counts[HealthStatus.UNHEALTHY] + counts[HealthStatus.UNKNOWN],
        total_models=len(results),
        models={name: health.status for name, health in results.items()},
        memory_mb=checker.process_memory_mb(),
        gpu_available=checker.gpu.available,
        gpu_memory_mb=checker.process_gpu_memory_mb(),
        cache=(
            CacheState(
                backend=cache.backend,
                status="healthy" if cache.up else "degraded",
                reason=None if cache.up else cache.reason,
            )
            if cache is not None
            else None
        ),
        limits=limits,
        checked_at=utc_now(),
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if serving else 503)


async def _limits_state(request: Request) -> LimitsState | None:
    """The keys' limits backend, when some key has a rate to count."""
    settings: Settings = request.app.state.settings
    if not any(key.rpm or key.tpm for key in settings.auth.keys):
        return None
    limits: Limits = request.app.state.limits
    health = await limits.health()
    return LimitsState(
        backend=health.backend,
        status="healthy" if health.up else "degraded",
        reason=None if health.up else health.reason,
    )


def _serving(answer: Any, serves: str, fails: str) -> dict[int, Answer]:
    """200 and 503, both with the same body."""
    return {200: Answer(serves, answer), 503: Answer(fails, answer)}


def _kube_probe(
    path: str,
    summary: str,
    check: Callable[[HealthChecker], tuple[bool, str | None]],
    answer: type[KubeProbe],
    serves: str,
    fails: str,
) -> ApiRoute:
    """A Kubernetes probe: ``check``'s verdict, 200 or 503."""

    async def probe(request: Request) -> Response:
        ok, reason = check(_checker(request))
        body = answer.of(ok, reason).model_dump(mode="json")
        return JSONResponse(body, status_code=200 if ok else 503)

    return ApiRoute(
        path, probe, method="GET", summary=summary, responses=_serving(answer, serves, fails)
    )


routes = [
    ApiRoute(
        "/health/llm",
        model_health,
        method="GET",
        summary="One member's tri-state health",
        query=ModelHealthQuery,
        responses={
            **_serving(ModelHealth, "Healthy or degraded.", "Unhealthy or still loading."),
            **errors(400, 401, 404),
        },
    ),
    ApiRoute(
        "/health/llm/all",
        all_health,
        method="GET",
        summary="Every member's health",
        query=EnsembleHealthQuery,
        responses={
            **_serving(EnsembleHealth, "Some member serves.", "No member serves."),
            **errors(400, 401),
        },
    ),
    _kube_probe(
        "/health/ready",
        "Kubernetes readiness",
        HealthChecker.check_readiness,
        Readiness,
        "A member can serve.",
        "Loading, or no member can serve.",
    ),
    _kube_probe(
        "/health/live",
        "Kubernetes liveness",
        HealthChecker.check_liveness,
        Liveness,
        "Alive.",
        "Stuck: loop lag, stuck inference or lease.",
    ),
]
