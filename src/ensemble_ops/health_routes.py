"""Health routes: per-model and ensemble health, Kubernetes readiness and liveness.

They read state already in memory (no inference unless ``run_inference=true``), so they
answer in milliseconds while every model is busy.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import InvalidRequestError, ModelNotFoundError
from .health import HealthChecker, HealthStatus, utc_now

__all__ = ["routes"]

_TRUE, _FALSE = "true", "false"


def _checker(request: Request) -> HealthChecker:
    checker: HealthChecker = request.app.state.health
    return checker


def _run_inference(request: Request) -> bool:
    raw = request.query_params.get("run_inference", _FALSE)
    if raw in (_TRUE, _FALSE):
        return raw == _TRUE
    raise InvalidRequestError(
        f"run_inference must be true or false, not {raw!r}.", param="run_inference"
    )


async def model_health(request: Request) -> Response:
    checker = _checker(request)
    name = request.query_params.get("model")
    if not name:
        raise InvalidRequestError("The query parameter 'model' is required.", param="model")
    run_inference = _run_inference(request)
    if name not in checker.slots:
        raise ModelNotFoundError(name, list(checker.slots))
    health = await checker.check_model_health(name, run_inference)
    return JSONResponse(health.to_dict(), status_code=200 if health.status.serving else 503)


async def all_health(request: Request) -> Response:
    checker = _checker(request)
    results = await checker.check_all_models(_run_inference(request))
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
    body = {
        "status": overall.value,
        "healthy_count": counts[HealthStatus.HEALTHY],
        "degraded_count": counts[HealthStatus.DEGRADED],
        "unhealthy_count": counts[HealthStatus.UNHEALTHY] + counts[HealthStatus.UNKNOWN],
        "total_models": len(results),
        "models": {name: health.status.value for name, health in results.items()},
        "memory_mb": checker.process_memory_mb(),
        "gpu_available": checker.gpu.available,
        "gpu_memory_mb": checker.process_gpu_memory_mb(),
        "checked_at": utc_now(),
    }
    return JSONResponse(body, status_code=200 if serving else 503)


async def ready(request: Request) -> Response:
    ok, reason = _checker(request).check_readiness()
    if ok:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not_ready", "reason": reason}, status_code=503)


async def live(request: Request) -> Response:
    ok, reason = _checker(request).check_liveness()
    if ok:
        return JSONResponse({"status": "alive"})
    return JSONResponse({"status": "dead", "reason": reason}, status_code=503)


routes = [
    Route("/health/llm", model_health, methods=["GET"]),
    Route("/health/llm/all", all_health, methods=["GET"]),
    Route("/health/ready", ready, methods=["GET"]),
    Route("/health/live", live, methods=["GET"]),
]
