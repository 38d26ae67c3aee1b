"""The OpenAPI document is generated from the routes and models, and the app keeps to it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import jsonschema_rs
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from starlette.routing import Route

from ensemble_ops.config import Settings
from ensemble_ops.http.app import create_app

from ..conftest import AppClient, SettingsFactory, serving

Document = dict[str, Any]


def _routes(settings: Settings, *, admin: bool = False) -> set[tuple[str, str]]:
    public = create_app(settings)
    app = public.state.admin_app if admin else public
    pairs = set()
    for route in app.routes:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":  # Starlette adds HEAD to every GET
                pairs.add((route.path, method.lower()))
    return pairs


def _documented(document: Document) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items() for method in item}


def _schemas(value: Any) -> Iterator[Any]:
    """Every JSON Schema in the document: the components and the parameters' and bodies'."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "schemas":
                yield from item.values()
            elif key == "schema":
                yield item
            else:
                yield from _schemas(item)
    elif isinstance(value, list):
        for item in value:
            yield from _schemas(item)


def _validate(document: Document, schema: dict[str, Any], instance: Any) -> None:
    """Validate ``instance`` against ``schema``, its ``$ref``s resolved in ``document``."""
    jsonschema_rs.Draft202012Validator(schema | {"components": document["components"]}).validate(
        instance
    )


def _check(document: Document, path: str, method: str, response: httpx.Response) -> None:
    """The status is documented for the operation, and the body fits its media type's schema."""
    answers = document["paths"][path][method]["responses"]
    assert str(response.status_code) in answers, (path, response.status_code, response.text)
    media = response.headers["content-type"].split(";")[0]
    schema = answers[str(response.status_code)]["content"][media]["schema"]
    if media == "application/json":
        _validate(document, schema, response.json())
    elif media == "text/event-stream":
        data = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
        assert data[-1] == "[DONE]"
        for item in data:
            _validate(document, schema, {"data": item})
        (chunk,) = (
            branch["contentSchema"]
            for branch in schema["properties"]["data"]["anyOf"]
            if "contentSchema" in branch
        )
        for item in data[:-1]:
            _validate(document, chunk, json.loads(item))
    else:
        _validate(document, schema, response.text)


def _example(path: str, operation: dict[str, Any]) -> str:
    """A URL of ``path`` with every required parameter: the first value its schema lists."""
    query = []
    for parameter in operation.get("parameters", ()):
        if parameter["required"]:
            value = parameter["schema"]["enum"][0]
            if parameter["in"] == "path":
                path = path.replace(f"{{{parameter['name']}}}", value)
            else:
                query.append(f"{parameter['name']}={value}")
    return f"{path}?{'&'.join(query)}" if query else path


@pytest.fixture(name="document")
async def _document(client: AppClient) -> Document:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document: Document = response.json()
    return document


class TestDocument:
    async def test_document_matches_the_routes(
        self, document: Document, settings: Settings
    ) -> None:
        """Every route is documented, and every documented operation is a route."""
        assert _documented(document) == _routes(settings)

    async def test_each_listener_documents_its_own_routes(
        self, client: AppClient, document: Document, settings: Settings
    ) -> None:
        """The public document has no admin route; the admin listener's has them all."""
        admin: Document = (await client.admin.get("/openapi.json")).json()
        assert _documented(admin) == _routes(settings, admin=True)
        assert not any(path.startswith("/admin/") for path, _ in _documented(document))
        assert ("/admin/models/{model}/reload", "post") in _documented(admin)

    async def test_is_valid_openapi_31(self, document: Document) -> None:
        """The document is OpenAPI 3.1, and every schema in it is valid JSON Schema 2020-12."""
        assert document["openapi"] == "3.1.0"
        OPENAPI_31_VALIDATOR.validate(document)
        schemas = list(_schemas(document))
        assert len(schemas) > len(document["components"]["schemas"])
        for schema in schemas:
            jsonschema_rs.meta.validate(schema)

    async def test_without_metrics(self, make_settings: SettingsFactory) -> None:
        """metrics.enabled = false removes the metrics routes from both."""
        settings = make_settings(metrics={"enabled": False})
        async with serving(create_app(settings)) as client:
            document = (await client.get("/openapi.json")).json()
        assert "/metrics" not in document["paths"]
        assert _documented(document) == _routes(settings)

    async def test_metrics_are_plain_text(self, document: Document) -> None:
        """The Prometheus exposition is documented as text/plain."""
        answer = document["paths"]["/metrics"]["get"]["responses"]["200"]
        assert answer["content"] == {"text/plain": {"schema": {"type": "string"}}}

    async def test_request_schemas_come_from_the_validators(self, document: Document) -> None:
        """The completion body schema is the pydantic model's: same fields, same limits."""
        body = document["components"]["schemas"]["CompletionBody"]
        assert body["required"] == ["prompt"]
        assert {
            "model",
            "mode",
            "max_tokens",
            "temperature",
            "top_p",
            "seed",
            "stop",
            "stream",
        } <= set(body["properties"])
        mode = body["properties"]["mode"]
        assert "fast" in str(mode)
        assert "creative" in str(mode)

    async def test_model_names_are_enumerated(self, document: Document) -> None:
        """Path and query parameters naming a member list this server's members."""
        members = ["demo-tiny", "demo-small", "demo-base"]
        (param,) = document["paths"]["/health/llm/reload/{model}"]["get"]["parameters"]
        assert param["schema"]["enum"] == members
        query = document["paths"]["/health/llm"]["get"]["parameters"]
        assert [(p["name"], p["in"], p["required"]) for p in query] == [
            ("model", "query", True),
            ("run_inference", "query", False),
        ]
        assert query[0]["schema"]["enum"] == members
        assert query[1]["schema"]["enum"] == ["true", "false"]

    async def test_inference_routes_declare_their_headers(self, document: Document) -> None:
        """The session and copy headers are documented with the limits the server checks."""
        for path in ("/v1/completions", "/v1/chat/completions"):
            parameters = document["paths"][path]["post"]["parameters"]
            assert [(p["name"], p["in"], p["required"]) for p in parameters] == [
                ("X-Session-ID", "header", False),
                ("X-Ensemble-Copy", "header", False),
            ]
            assert parameters[0]["schema"] == {"type": "string", "maxLength": 256}
            assert "stable" in parameters[1]["description"]
        body = document["components"]["schemas"]["CompletionBody"]
        assert "user" in body["properties"]

    async def test_errors_share_one_schema(self, document: Document) -> None:
        """Every 4xx answer, and the inference routes' 5xx, reference ErrorResponse."""
        answers = [
            answer
            for path, item in document["paths"].items()
            for operation in item.values()
            for code, answer in operation["responses"].items()
            if 400 <= int(code) < 500 or (code.startswith("5") and path.startswith("/v1/"))
        ]
        assert answers
        for answer in answers:
            schema = answer["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}

    async def test_optional_fields_are_not_required(self, document: Document) -> None:
        """Fields left out when unset are optional in the schema; the others are required."""
        schemas = document["components"]["schemas"]
        assert "usage" not in schemas["CompletionChunk"]["required"]
        assert "probe" not in schemas["ModelHealth"]["required"]
        assert "status" not in schemas["ErrorResponse"]["required"]
        assert {"logprobs", "finish_reason"} <= set(schemas["CompletionChunkChoice"]["required"])
        assert "system_fingerprint" in schemas["Completion"]["required"]


class TestResponsesMatchTheDocument:
    async def test_every_get_route(self, client: AppClient, document: Document) -> None:
        """Each GET route, called with its required parameters, answers as documented."""
        for path, item in document["paths"].items():
            if path == "/events":
                continue  # never ends by itself: tests/http/test_events.py reads it live
            if "get" in item:
                url = _example(path, item["get"])
                _check(document, path, "get", await client.get(url))

    @pytest.mark.parametrize(
        "url",
        [
            "/health/llm?model=demo-tiny&run_inference=true",
            "/health/llm/all?run_inference=true",
            "/health/llm",
            "/health/llm?model=demo-tiny&run_inference=maybe",
            "/health/llm?model=nobody",
            "/health/llm/reload/nobody",
        ],
    )
    async def test_health_answers_and_errors(
        self, client: AppClient, document: Document, url: str
    ) -> None:
        """Health with a probe, and the 400 and 404 answers, fit the document."""
        response = await client.get(url)
        _check(document, url.split("?")[0].replace("nobody", "{model}"), "get", response)

    @pytest.mark.parametrize(
        ("path", "body"),
        [
            ("/v1/completions", {"prompt": "Hi", "max_tokens": 4}),
            ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "stream": True}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
            (
                "/v1/chat/completions",
                {
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 4,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            ),
            ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}),
            ("/v1/chat/completions", {"model": "nobody", "messages": []}),
            ("/v1/completions", {"model": "nobody", "prompt": "Hi"}),
        ],
    )
    async def test_inference(
        self, client: AppClient, document: Document, path: str, body: dict[str, Any]
    ) -> None:
        """Answers, event streams and errors of the inference routes fit the document."""
        _check(document, path, "post", await client.post(path, json=body))

    async def test_models_with_a_split(self, make_settings: SettingsFactory) -> None:
        """/v1/models with a split (its own kind of entry) fits the document."""
        settings = make_settings()
        members = {m.name: 1.0 for m in settings.models}
        settings = make_settings(splits={"all": {"weights": members}})
        async with serving(create_app(settings)) as client:
            document = (await client.get("/openapi.json")).json()
            response = await client.get("/v1/models")
        assert response.json()["data"][1]["meta"]["kind"] == "split"
        _check(document, "/v1/models", "get", response)

    async def test_reload_and_conflict(self, client: AppClient) -> None:
        """A started reload (202), one refused while it runs (409) and its status fit the
        admin listener's document."""
        document: Document = (await client.admin.get("/openapi.json")).json()
        path = "/admin/models/{model}/reload"
        started = await client.admin.post("/admin/models/demo-tiny/reload")
        assert started.status_code == 202
        _check(document, path, "post", started)
        refused = await client.admin.post("/admin/models/demo-tiny/reload")
        assert refused.status_code == 409
        _check(document, path, "post", refused)
        with anyio.fail_after(30):
            while True:
                status = await client.get("/health/llm/reload/demo-tiny")
                _check(document, "/health/llm/reload/{model}", "get", status)
                if status.json()["state"] in ("completed", "failed"):
                    break
                await anyio.sleep(0.05)
        assert status.json()["state"] == "completed"
