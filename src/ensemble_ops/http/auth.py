"""Who may call what.

Two listeners, two apps. The admin listener (``server.admin_bind``: loopback or a Unix socket
by default) serves the admin routes, which the public listener does not have at all: no
proxy in front of the public port can open them, whatever headers it adds. When
``server.admin_token`` is set every admin request needs it. Operators on the admin listener
also reach ``/v1/*``, with no API key, and may choose a rollout's copy.

On the public listener, with ``[[auth.keys]]`` configured, ``/v1/*`` needs a key
(``Authorization: Bearer`` or ``X-Api-Key``); with ``auth.protect_observability`` the
observability routes need one too. Keys are compared by their SHA-256 in constant time and
never logged; a malformed credential is a 401 like a wrong one, never a 5xx.
"""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.requests import Request

from ensemble_ops.access.keys import ANONYMOUS, MAX_KEY_CHARS, OPERATOR, Caller, Keyring
from ensemble_ops.config import Settings, admin_address, is_loopback
from ensemble_ops.errors import InvalidApiKeyError

__all__ = [
    "ADMIN",
    "PUBLIC",
    "caller_of",
    "csrf_token",
    "is_admin",
    "require_admin",
    "require_observer",
]

PUBLIC, ADMIN = "public", "admin"
"""Which listener an app serves (``app.state.listener``)."""


def is_admin(request: Request) -> bool:
    """Whether the request came in on the admin listener."""
    return bool(request.app.state.listener == ADMIN)


def require_admin(request: Request) -> None:
    """An admin route: the admin listener only (it has no such routes elsewhere, this is
    the second lock), with the bearer token when one is configured."""
    if not is_admin(request):
        raise HTTPException(404, "Not Found")
    _same_site(request)
    settings: Settings = request.app.state.settings
    token = settings.server.admin_token
    if token is None:
        return  # the listener itself is local: loopback or a Unix socket (checked at start)
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.get_secret_value().encode()
    ):
        raise HTTPException(
            401,
            "A valid admin token is required (Authorization: Bearer <token>).",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _same_site(request: Request) -> None:
    """A browser's admin request (it has an ``Origin``) must come from the status page the
    admin listener served: its own origin, at a Host that names this listener (not a name
    an attacker's DNS points here), with the page's CSRF token. A browser on the operator's
    machine reaches a loopback port from any web page; these checks keep such pages out.
    Requests without an Origin (the CLI, curl) are no browser's."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("host", "")
    if not _our_host(request, host) or origin != f"{request.url.scheme}://{host}":
        raise HTTPException(403, "Cross-site admin requests are refused.")
    given = request.headers.get("x-csrf-token", "")
    expected: str = request.app.state.csrf_token
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode()):
        raise HTTPException(403, "The status page's CSRF token is missing or wrong.")


def _our_host(request: Request, host: str) -> bool:
    """Whether ``host`` (a Host header) names this machine's loopback or the admin bind."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.removeprefix("[").removesuffix("]")
    settings: Settings = request.app.state.settings
    bound = admin_address(settings.server.admin_bind)
    return is_loopback(name) or (isinstance(bound, tuple) and name == bound[0])


def csrf_token(request: Request) -> str | None:
    """The admin page's CSRF token, for a page loaded at a Host that names this listener
    (None elsewhere: such a page gets no way to act)."""
    if not _our_host(request, request.headers.get("host", "")):
        return None
    token: str = request.app.state.csrf_token
    return token


def caller_of(request: Request) -> Caller:
    """Who calls ``/v1/*``: an operator on the admin listener; on the public one, the key's
    owner when keys are configured (else anyone, ``anonymous``). Raises
    ``InvalidApiKeyError`` (401) for a missing, malformed or unknown key."""
    if is_admin(request):
        return OPERATOR
    keyring: Keyring = request.app.state.keyring
    if not keyring.enabled:
        return ANONYMOUS
    return _identify(request, keyring)


def require_observer(request: Request) -> None:
    """An observability route (metrics, health details, events, the status page): open,
    unless ``auth.protect_observability``, then any configured key opens it."""
    settings: Settings = request.app.state.settings
    if is_admin(request) or not settings.auth.protect_observability:
        return
    keyring: Keyring = request.app.state.keyring
    if keyring.enabled:
        _identify(request, keyring)


def _identify(request: Request, keyring: Keyring) -> Caller:
    presented = _credential(request)
    caller = keyring.identify(presented)
    if caller is None:
        raise _refused("The API key is not valid.")
    return caller


def _credential(request: Request) -> str:
    """The key a request presents, or a 401 saying what is wrong with it (never its value)."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise _refused("The Authorization header must use the Bearer scheme.")
    else:
        value = request.headers.get("x-api-key", "")
    value = value.strip()
    if not value:
        raise _refused("An API key is required.")
    if len(value) > MAX_KEY_CHARS or not value.isascii() or not value.isprintable():
        raise _refused("The API key is malformed.")
    return value


def _refused(reason: str) -> InvalidApiKeyError:
    return InvalidApiKeyError(reason)
