"""The OpenAPI 3.1 document of the HTTP surface, generated from the routes and the models.

Every route is an :class:`ApiRoute`: a Starlette route that also declares its query model,
its request body and its answers by status (as vLLM declares ``responses={400: {"model":
ErrorResponse}}``). :func:`build_openapi` walks the app's routes and asks pydantic for every
schema, so the document says what the code validates and sends, and nothing else; it is
served at ``/openapi.json`` by :func:`openapi_route`, and schemathesis fuzzes a live server
against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ensemble_ops._version import __version__
from ensemble_ops.http.protocol import ErrorResponse, StreamError

__all__ = ["Answer", "ApiRoute", "Operation", "build_openapi", "errors", "openapi_route"]

_REF = "#/components/schemas/{model}"

_ERRORS = {
    400: "Malformed JSON or an invalid field (the error's param names it).",
    401: "An API key (or, on the admin listener, the admin token) is missing or wrong.",
    403: "A model the key may not use, or X-Ensemble-Copy on the public listener.",
    404: "Unknown model (or an admin route on the public listener).",
    409: "A reload of this member is already running.",
    413: "The request body is over server.max_body_bytes.",
    429: "A key's limit (rpm, tpm or max_parallel); see Retry-After and x-ratelimit-*.",
    500: "The inference engine failed.",
    503: "Overloaded, loading, or no member can serve (see Retry-After).",
}


@dataclass(frozen=True)
class Answer:
    """One documented response: what it means and its body, in one or more media types."""

    description: str
    json: Any = None
    """The type of the JSON body: a response model, a core dataclass, ``dict[str, ...]``."""
    events: type[BaseModel] | None = None
    """``text/event-stream``, each event's data one of these chunks as JSON."""
    text: bool = False
    """``text/plain``."""
    media: str | None = None
    """Another media type, as a string body: ``text/html``, a ``text/event-stream`` of
    records that are not completion chunks."""


def errors(*codes: int) -> dict[int, Answer]:
    """The error answers of a route, each an :class:`ErrorResponse`."""
    return {code: Answer(_ERRORS[code], json=ErrorResponse) for code in codes}


@dataclass(frozen=True)
class Operation:
    """What the document says of one route besides its path and method."""

    summary: str
    responses: Mapping[int, Answer]
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    body_required: bool = True
    admin: bool = False
    """Needs the admin token (or a loopback client when none is set)."""
    headers: type[BaseModel] | None = None
    """The request headers the route reads, by alias (``X-Session-ID``)."""


class ApiRoute(Route):
    """A route of one method that documents itself: ``ApiRoute(path, endpoint, method=...,
    summary=..., responses={200: Answer(...), **errors(400)})``."""

    def __init__(
        self,
        path: str,
        endpoint: Callable[[Request], Any],
        *,
        method: str,
        summary: str,
        responses: Mapping[int, Answer],
        query: type[BaseModel] | None = None,
        body: type[BaseModel] | None = None,
        body_required: bool = True,
        admin: bool = False,
        headers: type[BaseModel] | None = None,
    ) -> None:
        super().__init__(path, endpoint, methods=[method])
        self.method = method.lower()
        self.operation = Operation(summary, responses, query, body, body_required, admin, headers)


_Key: TypeAlias = tuple[Any, JsonSchemaMode]
_Made: TypeAlias = Mapping[_Key, Any]
"""The schema of each type the operations name (a ``$ref`` for a model), by type and mode."""


def _schemas(routes: Sequence[ApiRoute]) -> tuple[_Made, dict[str, Any]]:
    """Every schema the operations name, generated in one pass; and the components."""
    wanted: dict[_Key, TypeAdapter[Any]] = {
        (StreamError, "serialization"): TypeAdapter(StreamError)
    }
    for route in routes:
        spec = route.operation
        keys: list[_Key] = [(spec.body, "validation")] if spec.body is not None else []
        for answer in spec.responses.values():
            keys += [(tp, "serialization") for tp in (answer.json, answer.events) if tp is not None]
        for key in keys:
            if key not in wanted:
                wanted[key] = TypeAdapter(key[0])
    made, defs = TypeAdapter.json_schemas(
        [(tp, mode, adapter) for (tp, mode), adapter in wanted.items()], ref_template=_REF
    )
    components: dict[str, Any] = defs.get("$defs", {})
    return made, components


def _event_stream(chunk: Any, error: Any) -> dict[str, Any]:
    """One server-sent event: Open API 3.1 has ``schema`` describe each event of a stream."""
    data = {"contentMediaType": "application/json", "contentSchema": {"anyOf": [chunk, error]}}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "description": "A chunk as JSON; a StreamError when the engine fails after "
                "text was sent; [DONE] last.",
                "anyOf": [{"const": "[DONE]"}, data],
            },
            "event": {"type": "string"},
        },
    }


def _content(answer: Answer, made: _Made) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if answer.json is not None:
        content["application/json"] = {"schema": made[answer.json, "serialization"]}
    if answer.events is not None:
        chunk, error = (made[tp, "serialization"] for tp in (answer.events, StreamError))
        stream = _event_stream(chunk, error)
        content["text/event-stream"] = {"schema": stream}
    if answer.text:
        content["text/plain"] = {"schema": {"type": "string"}}
    if answer.media is not None:
        content[answer.media] = {"schema": {"type": "string"}}
    return content


def _parameters(route: ApiRoute, member: dict[str, Any]) -> list[dict[str, Any]]:
    """Path parameters, then the query model's fields, then the headers model's; one named
    ``model`` names a member."""
    found: list[tuple[str, str, bool, dict[str, Any]]] = [
        (name, "path", True, {"type": "string"}) for name in route.param_convertors
    ]
    for where, model in (("query", route.operation.query), ("header", route.operation.headers)):
        if model is not None:
            fields = model.model_json_schema(mode="validation")
            for name, prop in fields["properties"].items():
                found.append((name, where, name in fields.get("required", ()), prop))
    parameters = []
    for name, where, required, prop in found:
        schema = {k: v for k, v in prop.items() if k not in ("title", "description")}
        parameter = {
            "name": name,
            "in": where,
            "required": required,
            **({"description": prop["description"]} if "description" in prop else {}),
            "schema": schema | member if name == "model" else schema,
        }
        parameters.append(parameter)
    return parameters


def _operation(route: ApiRoute, made: _Made, member: dict[str, Any]) -> dict[str, Any]:
    spec = route.operation
    operation: dict[str, Any] = {"summary": spec.summary}
    if parameters := _parameters(route, member):
        operation["parameters"] = parameters
    if spec.admin:
        operation["security"] = [{"bearer": []}, {}]
    if spec.body is not None:
        operation["requestBody"] = {
            "required": spec.body_required,
            "content": {"application/json": {"schema": made[spec.body, "validation"]}},
        }
    operation["responses"] = {
        str(code): {"description": answer.description, "content": _content(answer, made)}
        for code, answer in sorted(spec.responses.items())
    }
    return operation


def build_openapi(routes: Iterable[BaseRoute], *, members: Sequence[str]) -> dict[str, Any]:
    """The document of ``routes`` (the :class:`ApiRoute` ones): OpenAPI 3.1, JSON Schema
    2020-12 from pydantic. ``members`` are the valid model names of this server."""
    documented = [route for route in routes if isinstance(route, ApiRoute)]
    made, components = _schemas(documented)
    member: dict[str, Any] = {"enum": list(members)} if members else {}
    paths: dict[str, Any] = {}
    for route in documented:
        paths.setdefault(route.path_format, {})[route.method] = _operation(route, made, member)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ensemble-ops",
            "version": __version__,
            "description": "OpenAI-compatible API over an ensemble of GGUF models, "
            "with health, reload and metrics.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def openapi_route(*, members: Sequence[str]) -> ApiRoute:
    """``GET /openapi.json``: the document of the app this route is in, made on first use
    (the app's routes are only known once it is built)."""
    documents: list[dict[str, Any]] = []

    async def openapi(request: Request) -> Response:
        if not documents:
            documents.append(build_openapi(request.app.routes, members=members))
        return JSONResponse(documents[0])

    return ApiRoute(
        "/openapi.json",
        openapi,
        method="GET",
        summary="This document",
        responses={200: Answer("OpenAPI 3.1.", json=dict[str, Any])},
    )
