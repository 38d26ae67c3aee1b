"""The status page: ``GET /`` (also ``/status``), its two assets, and ``GET /status.json``.

The page is static (shipped in the package, no CDN): it reads ``/status.json`` for the
picture and follows ``/events`` for what changes. On the public listener it is read-only and
shows file names, never paths, and no request content. On the admin listener it adds
reload, promote and abort; those POSTs carry the CSRF token ``/status.json`` hands out there
(``http/auth.py`` checks it with the Origin and Host of every browser request).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ensemble_ops.http.auth import csrf_token, is_admin, require_observer
from ensemble_ops.http.openapi import Answer, ApiRoute, errors
from ensemble_ops.http.protocol import dump_reload_status
from ensemble_ops.observability.event_feed import EventFeed, file_names_only
from ensemble_ops.observability.recent import RecentFigures

__all__ = ["RECENT_REQUESTS", "routes"]

RECENT_REQUESTS = 50
_STATIC = files("ensemble_ops.http").joinpath("static")
_ASSETS = {
    "status.html": "text/html; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
}
_CACHE = {"Cache-Control": "no-cache"}  # revalidated: a new release's page is seen at once


def _file(name: str) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint answering with one of the page's files, read once. The page itself holds
    no data: with ``auth.protect_observability`` it asks for a key and sends it with its
    requests for ``/status.json`` and ``/events``."""
    body = _STATIC.joinpath(name).read_bytes()
    media = _ASSETS[name]

    async def serve(request: Request) -> Response:
        return Response(body, media_type=media, headers=_CACHE)

    return serve


def _asset(name: str) -> ApiRoute:
    kind = name.rsplit(".", 1)[1]
    return ApiRoute(
        f"/status/app.{kind}",
        _file(name),
        method="GET",
        summary=f"The status page's {kind}",
        responses={200: Answer("The file.", media=_ASSETS[name].split(";")[0])},
    )


async def snapshot(request: Request) -> Response:
    require_observer(request)
    state = request.app.state
    checker, ensemble, reload = state.health, state.ensemble, state.reload
    recent: RecentFigures = state.recent
    feed: EventFeed = state.events
    ready, ready_reason = checker.check_readiness()
    live, live_reason = checker.check_liveness()
    cache = await ensemble.cache_health()
    members = []
    for name, health in (await checker.check_all_models()).items():
        slot = ensemble.slots[name]
        active = slot.active
        info = active.engine.info if active is not None else None
        status = dump_reload_status(reload.get_reload_status(name))
        status["message"] = file_names_only(status["message"])
        status["error"] = file_names_only(status["error"])
        members.append(
            {
                "name": name,
                "health": health.status.value,
                "reason": file_names_only(health.error_message),
                "state": slot.state,
                "generation": active.generation if active is not None else None,
                "file": slot.spec.path.name,
                "architecture": info.architecture if info is not None else None,
                "capabilities": sorted(info.capabilities) if info is not None else [],
                "memory_mb": health.memory_mb,
                "kv_usage": round(active.engine.kv_usage, 4) if active is not None else None,
                "in_flight": active.in_flight if active is not None else 0,
                "parallel": active.parallel if active is not None else slot.spec.parallel,
                "queue_depth": (
                    max(active.in_flight - active.parallel, 0) if active is not None else 0
                ),
                "recent": recent.series(name),
                "reload": status,
            }
        )
    answer: dict[str, Any] = {
        "admin": is_admin(request),
        "ensemble": {
            "ready": ready,
            "ready_reason": ready_reason,
            "live": live,
            "live_reason": live_reason,
            "cache": (
                None
                if cache is None
                else {"backend": cache.backend, "up": cache.up, "reason": cache.reason}
            ),
            "requests_per_s": recent.requests_per_s(),
            "hit_share": recent.hit_share(),
            "bucket_s": recent.bucket_s,
        },
        "members": members,
        "recent_requests": [e.as_dict() for e in feed.recent("request", RECENT_REQUESTS)],
        "last_event_id": feed.last_id,
    }
    if is_admin(request):
        answer["csrf_token"] = csrf_token(request)  # None where a browser may not act
    return JSONResponse(answer, headers={"Cache-Control": "no-store"})


_PAGE = {200: Answer("The status page (HTML).", media="text/html")}

_page = _file("status.html")

routes = [
    ApiRoute("/", _page, method="GET", summary="The status page", responses=_PAGE),
    ApiRoute("/status", _page, method="GET", summary="The status page", responses=_PAGE),
    _asset("status.js"),
    _asset("status.css"),
    ApiRoute(
        "/status.json",
        snapshot,
        method="GET",
        summary="What the status page shows: members, the ensemble, recent requests",
        responses={
            200: Answer(
                "Each member's health, state, file name, memory, slots and recent figures, "
                "its reload; the ensemble's readiness, liveness, cache and rates; the last "
                "50 requests (no content).",
                json=dict[str, Any],
            ),
            **errors(401, 403),
        },
    ),
]
