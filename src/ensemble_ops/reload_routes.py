"""Admin and reload routes.

``POST /admin/models/{model}/reload`` and ``GET /admin/models`` need the admin token as a
bearer token when one is configured; without one they answer loopback clients only.
``GET /health/llm/reload/{model}`` is read-only and open like the other health routes.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .api import read_json
from .config import Settings
from .errors import InvalidRequestError, ModelNotFoundError
from .reload import ReloadManager

__all__ = ["routes"]


def _manager(request: Request) -> ReloadManager:
    manager: ReloadManager = request.app.state.reload
    return manager


def require_admin(request: Request) -> None:
    """Bearer token when configured (compared in constant time), else loopback only."""
    settings: Settings = request.app.state.settings
    token = settings.server.admin_token
    if token is not None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.get_secret_value().encode()
        ):
            raise HTTPException(
                401,
                "A valid admin token is required (Authorization: Bearer <token>).",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return
    host = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise HTTPException(
            403,
            "Admin routes answer loopback clients only when no admin token is set "
            "(set server.admin_token to allow remote admins).",
        )


def _known(manager: ReloadManager, model: str) -> None:
    if model not in manager.slots:
        raise ModelNotFoundError(model, list(manager.slots))


async def start_reload(request: Request) -> Response:
    require_admin(request)
    manager = _manager(request)
    model = request.path_params["model"]
    _known(manager, model)
    options = await read_json(request, empty={})
    if not isinstance(options, dict) or set(options) - {"path", "warmup_iterations"}:
        raise InvalidRequestError(
            'The body may hold only "path" (a GGUF file inside the model directory) and '
            '"warmup_iterations" (1-100).'
        )
    path = options.get("path")
    iterations = options.get("warmup_iterations")
    if "path" in options and (not isinstance(path, str) or not path):
        raise InvalidRequestError("path must be a non-empty string.", param="path")
    if "warmup_iterations" in options and (
        not isinstance(iterations, int)
        or isinstance(iterations, bool)
        or not 1 <= iterations <= 100
    ):
        raise InvalidRequestError(
            "warmup_iterations must be an integer from 1 to 100.", param="warmup_iterations"
        )
    status = manager.start_reload(model, warmup_iterations=iterations, path=path)
    return JSONResponse(
        status.to_dict(), status_code=202, headers={"Location": f"/health/llm/reload/{model}"}
    )


async def reload_status(request: Request) -> Response:
    manager = _manager(request)
    model = request.path_params["model"]
    _known(manager, model)
    return JSONResponse(manager.get_reload_status(model).to_dict())


async def list_members(request: Request) -> Response:
    require_admin(request)
    manager = _manager(request)
    members = []
    for name, slot in manager.slots.items():
        active = slot.active
        members.append(
            {
                "name": name,
                "state": slot.state,
                "path": str(slot.spec.path),
                "n_ctx": slot.spec.n_ctx,
                "n_gpu_layers": slot.spec.n_gpu_layers,
                "reload_strategy": slot.spec.reload_strategy,
                "generation": active.generation if active is not None else None,
                "in_flight": active.in_flight if active is not None else 0,
                "reload": manager.get_reload_status(name).to_dict(),
            }
        )
    return JSONResponse({"models": members})


routes = [
    Route("/admin/models/{model}/reload", start_reload, methods=["POST"]),
    Route("/admin/models", list_members, methods=["GET"]),
    Route("/health/llm/reload/{model}", reload_status, methods=["GET"]),
]
