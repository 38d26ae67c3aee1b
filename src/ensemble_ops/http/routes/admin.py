"""Admin and reload routes.

``POST /admin/models/{model}/reload``, ``promote``, ``abort`` and ``GET /admin/models`` are
served on the admin listener only (``routes``), with the admin token as a bearer token when
one is configured. ``GET /health/llm/reload/{model}`` (``status_routes``) is read-only and
on both listeners, like the other health routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ensemble_ops.errors import ModelNotFoundError
from ensemble_ops.http.auth import require_admin, require_observer
from ensemble_ops.http.openapi import Answer, ApiRoute, errors
from ensemble_ops.http.protocol import Member, MemberList, ReloadBody, dump_reload_status
from ensemble_ops.http.routes.openai import read_json
from ensemble_ops.reload.manager import ReloadManager
from ensemble_ops.reload.status import ReloadStatus

__all__ = ["routes", "status_routes"]

Endpoint = Callable[[Request], Awaitable[Response]]


def _manager(request: Request) -> ReloadManager:
    manager: ReloadManager = request.app.state.reload
    return manager


def _known(manager: ReloadManager, model: str) -> None:
    if model not in manager.slots:
        raise ModelNotFoundError(model, list(manager.slots), ensemble=False)


async def start_reload(request: Request) -> Response:
    require_admin(request)
    manager = _manager(request)
    model = request.path_params["model"]
    _known(manager, model)
    options = ReloadBody.parse(await read_json(request, empty={}))
    status = manager.start_reload(
        model,
        warmup_iterations=options.warmup_iterations,
        path=options.path,
        rollout=options.rollout_spec(manager.settings.rollout),
        allow_capability_change=options.allow_capability_change,
        quality=options.quality,
    )
    return JSONResponse(
        dump_reload_status(status),
        status_code=202,
        headers={"Location": f"/health/llm/reload/{model}"},
    )


def _decision(decide: Callable[[ReloadManager, str], ReloadStatus]) -> Endpoint:
    """The route of an operator's decision on a running rollout (promote, abort)."""

    async def decision(request: Request) -> Response:
        require_admin(request)
        manager = _manager(request)
        model = request.path_params["model"]
        _known(manager, model)
        return JSONResponse(dump_reload_status(decide(manager, model)))

    return decision


async def reload_status(request: Request) -> Response:
    require_observer(request)
    manager = _manager(request)
    model = request.path_params["model"]
    _known(manager, model)
    return JSONResponse(dump_reload_status(manager.get_reload_status(model)))


async def list_members(request: Request) -> Response:
    require_admin(request)
    manager = _manager(request)
    members = []
    for name, slot in manager.slots.items():
        active = slot.active
        members.append(
            Member(
                name=name,
                state=slot.state,
                path=str(slot.spec.path),
                n_ctx=slot.spec.n_ctx,
                n_gpu_layers=slot.spec.n_gpu_layers,
                reload_strategy=slot.spec.reload_strategy,
                generation=active.generation if active is not None else None,
                in_flight=active.in_flight if active is not None else 0,
                reload=manager.get_reload_status(name),
            )
        )
    return JSONResponse(MemberList(models=members).model_dump(mode="json"))


routes = [
    ApiRoute(
        "/admin/models/{model}/reload",
        start_reload,
        method="POST",
        summary="Reload a member without downtime",
        body=ReloadBody,
        body_required=False,
        admin=True,
        responses={
            202: Answer("Started; poll Location.", ReloadStatus),
            **errors(400, 401, 403, 404, 409, 413),
        },
    ),
    ApiRoute(
        "/admin/models/{model}/promote",
        _decision(ReloadManager.promote),
        method="POST",
        summary="Give a rollout's new copy all traffic now",
        admin=True,
        responses={
            200: Answer("Promoting; poll the reload status.", ReloadStatus),
            **errors(400, 401, 403, 404),
        },
    ),
    ApiRoute(
        "/admin/models/{model}/abort",
        _decision(ReloadManager.abort),
        method="POST",
        summary="Roll a running rollout back now",
        admin=True,
        responses={
            200: Answer("Rolling back; poll the reload status.", ReloadStatus),
            **errors(400, 401, 403, 404),
        },
    ),
    ApiRoute(
        "/admin/models",
        list_members,
        method="GET",
        summary="Members, files and reload states",
        admin=True,
        responses={200: Answer("The members.", MemberList), **errors(401, 403)},
    ),
]

status_routes = [
    ApiRoute(
        "/health/llm/reload/{model}",
        reload_status,
        method="GET",
        summary="A member's reload status",
        responses={200: Answer("The status.", ReloadStatus), **errors(401, 404)},
    ),
]
