"""Who may use the admin surface: the admin routes, and asking for a rollout's copy.

A bearer token when ``server.admin_token`` is set (compared in constant time, never logged);
loopback clients only when it is not.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.exceptions import HTTPException
from starlette.requests import Request

from ensemble_ops.config import Settings

__all__ = ["require_admin"]


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
