"""The OpenAPI document describes exactly the routes the app has."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.routing import Route

from ensemble_ops.app import create_app
from ensemble_ops.config import Settings

from .conftest import SettingsFactory


def _routes(settings: Settings) -> set[tuple[str, str]]:
    app = create_app(settings)
    pairs = set()
    for route in app.routes:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":  # Starlette adds HEAD to every GET
                pairs.add((route.path, method.lower()))
    return pairs


def _documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items() for method in item}


class TestOpenApi:
    async def test_document_matches_the_routes(
        self, client: httpx.AsyncClient, settings: Settings
    ) -> None:
        """Every route is documented, and every documented operation is a route."""
        document = (await client.get("/openapi.json")).json()
        assert document["openapi"] == "3.1.0"
        assert _documented(document) == _routes(settings)

    async def test_without_metrics(self, make_settings: SettingsFactory) -> None:
        """metrics.enabled = false removes the metrics routes from both."""
        from .conftest import serving

        settings = make_settings(metrics={"enabled": False})
        async with serving(create_app(settings)) as client:
            document = (await client.get("/openapi.json")).json()
        assert "/metrics" not in document["paths"]
        assert _documented(document) == _routes(settings)

    async def test_request_schemas_come_from_the_validators(
        self, client: httpx.AsyncClient
    ) -> None:
        """The completion body schema is the pydantic model's: same fields, same limits."""
        schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
        body = schemas["CompletionBody"]
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

    async def test_model_names_are_enumerated(self, client: httpx.AsyncClient) -> None:
        """Path and query parameters naming a member list this server's members."""
        document = (await client.get("/openapi.json")).json()
        (param,) = document["paths"]["/health/llm/reload/{model}"]["get"]["parameters"]
        assert param["schema"]["enum"] == ["demo-tiny", "demo-small", "demo-base"]
