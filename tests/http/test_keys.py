"""API keys on the inference API, in-process: who gets in, what each key may use, its
limits as 429s with OpenAI's headers, and the observability routes they may guard."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ensemble_ops.access.keys import new_key
from ensemble_ops.errors import ConfigError
from ensemble_ops.http.app import create_app
from ensemble_ops.serving.llama_engine import LlamaEngine

from ..conftest import AppClient, GatedEngine, SettingsFactory, serving

ALICE, ALICE_SHA = new_key()
BOB, BOB_SHA = new_key()
BODY = {"model": "demo-tiny", "prompt": "Hi", "max_tokens": 2, "temperature": 0}


def _keys(alice: dict[str, Any] | None = None, bob: dict[str, Any] | None = None) -> list[Any]:
    return [
        {"name": "alice", "key_sha256": ALICE_SHA, **(alice or {})},
        {"name": "bob", "key_sha256": BOB_SHA, **(bob or {})},
    ]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(name="keyed")
async def _keyed(make_settings: SettingsFactory) -> AsyncIterator[AppClient]:
    """The demo ensemble with two keys and no limits."""
    settings = make_settings(auth={"keys": _keys()})
    async with serving(create_app(settings)) as client:
        yield client


class TestAuthentication:
    async def test_no_keys_configured_means_open(self, client: AppClient) -> None:
        """Without [[auth.keys]] the API is open, as before (the key is "anonymous")."""
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200

    async def test_a_key_as_bearer_or_x_api_key(self, keyed: AppClient) -> None:
        bearer = await keyed.post("/v1/completions", json=BODY, headers=_bearer(ALICE))
        header = await keyed.post("/v1/completions", json=BODY, headers={"X-Api-Key": BOB})
        models = await keyed.get("/v1/models", headers=_bearer(BOB))
        assert (bearer.status_code, header.status_code, models.status_code) == (200, 200, 200)

    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"Authorization": "Bearer eo-not-a-key"},
            {"X-Api-Key": "eo-not-a-key"},
            {"Authorization": f"Bearer {ALICE}x"},
        ],
        ids=["none", "wrong-bearer", "wrong-x-api-key", "near-miss"],
    )
    async def test_missing_or_wrong_key_is_401(
        self, keyed: AppClient, headers: dict[str, str]
    ) -> None:
        """OpenAI's body (code invalid_api_key) and WWW-Authenticate; nothing was run."""
        for answer in (
            await keyed.post("/v1/completions", json=BODY, headers=headers),
            await keyed.post("/v1/chat/completions", json=BODY, headers=headers),
            await keyed.get("/v1/models", headers=headers),
        ):
            assert answer.status_code == 401
            assert answer.json()["error"]["code"] == "invalid_api_key"
            assert answer.headers["www-authenticate"].startswith("Bearer")
            assert "eo-" not in answer.text  # the presented key is never repeated

    @pytest.mark.parametrize(
        "value",
        [
            b"Bearer",
            b"Bearer    ",
            b"Basic YWxpY2U6c2VjcmV0",
            b"Token abc",
            b"Bearer " + b"k" * 8192,
            b"Bearer \xff\xfe\xc3\xa9",
            b"Bearer a\tb",
        ],
        ids=["empty", "blank", "basic", "other-scheme", "8kb", "non-ascii", "control"],
    )
    async def test_malformed_credentials_are_4xx_never_5xx(
        self, keyed: AppClient, value: bytes
    ) -> None:
        answer = await keyed.post("/v1/completions", json=BODY, headers=[(b"authorization", value)])
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "invalid_api_key"
        other = await keyed.post("/v1/completions", json=BODY, headers=[(b"x-api-key", value)])
        assert other.status_code == 401, other.text

    async def test_probes_and_the_document_stay_open(self, keyed: AppClient) -> None:
        for path in ("/health/live", "/health/ready", "/openapi.json", "/metrics"):
            assert (await keyed.get(path)).status_code == 200, path

    async def test_the_admin_listener_needs_no_key(self, keyed: AppClient) -> None:
        """Operators on the admin listener reach /v1/* without a key (the listener is
        local, or holds the admin token), as the key "operator"."""
        answer = await keyed.admin.post("/v1/completions", json=BODY)
        assert answer.status_code == 200
        metrics = (await keyed.get("/metrics")).text
        assert 'key="operator"' in metrics

    async def test_a_key_cannot_choose_a_rollout_copy(self, keyed: AppClient) -> None:
        answer = await keyed.post(
            "/v1/completions",
            json=BODY,
            headers=_bearer(ALICE) | {"X-Ensemble-Copy": "stable"},
        )
        assert answer.status_code == 403


class TestProtectedObservability:
    async def test_a_key_opens_metrics_and_health_details(
        self, make_settings: SettingsFactory
    ) -> None:
        """protect_observability: /metrics, /health/metrics*, /health/llm* need a key;
        liveness, readiness and /openapi.json stay open."""
        settings = make_settings(auth={"keys": _keys(), "protect_observability": True})
        guarded = [
            "/metrics",
            "/health/metrics",
            "/health/metrics/json",
            "/health/llm?model=demo-tiny",
            "/health/llm/all",
            "/health/llm/reload/demo-tiny",
        ]
        async with serving(create_app(settings)) as client:
            refused = [(await client.get(path)).status_code for path in guarded]
            opened = [
                (await client.get(path, headers=_bearer(BOB))).status_code for path in guarded
            ]
            open_ = [
                (await client.get(path)).status_code
                for path in ("/health/live", "/health/ready", "/openapi.json")
            ]
        assert refused == [401] * len(guarded)
        assert opened == [200] * len(guarded)
        assert open_ == [200, 200, 200]

    def test_protecting_without_keys_is_a_config_error(
        self, make_settings: SettingsFactory
    ) -> None:
        with pytest.raises(ConfigError, match="protect_observability needs at least one"):
            make_settings(auth={"protect_observability": True})


class TestModels:
    async def test_a_key_uses_only_its_models(self, make_settings: SettingsFactory) -> None:
        """models = [demo-tiny]: another member is 403 model_not_allowed, and /v1/models
        lists only what the key may use."""
        settings = make_settings(auth={"keys": _keys(alice={"models": ["demo-tiny"]})})
        async with serving(create_app(settings)) as client:
            allowed = await client.post("/v1/completions", json=BODY, headers=_bearer(ALICE))
            other = BODY | {"model": "demo-small"}
            refused = await client.post("/v1/completions", json=other, headers=_bearer(ALICE))
            routed = await client.post(
                "/v1/completions", json=BODY | {"model": "ensemble"}, headers=_bearer(ALICE)
            )
            listed = (await client.get("/v1/models", headers=_bearer(ALICE))).json()["data"]
            everything = (await client.get("/v1/models", headers=_bearer(BOB))).json()["data"]
        assert allowed.status_code == 200
        assert (refused.status_code, refused.json()["error"]["code"]) == (403, "model_not_allowed")
        assert routed.status_code == 403
        assert [card["id"] for card in listed] == ["demo-tiny"]
        assert len(everything) == 4  # ensemble and three members

    def test_a_key_naming_an_unknown_model_is_a_config_error(
        self, make_settings: SettingsFactory
    ) -> None:
        with pytest.raises(ConfigError, match="nope"):
            make_settings(auth={"keys": _keys(alice={"models": ["nope"]})})


class TestLimits:
    async def test_rpm_answers_429_with_openai_headers(
        self, make_settings: SettingsFactory
    ) -> None:
        """rpm = 12 holds two requests; the third is a 429 with Retry-After; every keyed
        answer carries x-ratelimit-*; the other key is not affected."""
        settings = make_settings(auth={"keys": _keys(alice={"rpm": 12})})
        async with serving(create_app(settings)) as client:
            answers = [
                await client.post("/v1/completions", json=BODY, headers=_bearer(ALICE))
                for _ in range(3)
            ]
            bob = await client.post("/v1/completions", json=BODY, headers=_bearer(BOB))
            metrics = (await client.get("/metrics")).text
        first, second, third = answers
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert first.headers["x-ratelimit-limit-requests"] == "12"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert second.headers["x-ratelimit-remaining-requests"] == "0"
        assert third.headers["x-ratelimit-remaining-requests"] == "0"
        assert third.headers["x-ratelimit-reset-requests"].endswith("s")
        assert 4 <= int(third.headers["retry-after"]) <= 5
        error = third.json()["error"]
        assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
        assert bob.status_code == 200
        assert "x-ratelimit-limit-requests" not in bob.headers  # bob has no limits
        assert 'llm_rate_limited_total{key="alice",limit="requests"} 1' in metrics
        assert 'llm_requests_total{copy="stable",key="alice",mode="balanced"' in metrics

    async def test_tpm_reserves_max_tokens_and_refunds_the_rest(
        self, make_settings: SettingsFactory
    ) -> None:
        """tpm = 900 holds 150 tokens. A request reserving 91 (its prompt, estimated, and
        max_tokens 90) leaves too little for a second; the part it did not use comes back
        at its end, so the next one fits."""
        settings = make_settings(cache={"enabled": False}, auth={"keys": _keys(alice={"tpm": 900})})
        body = BODY | {"max_tokens": 90, "stop": ["\n", " ", "."]}
        async with serving(create_app(settings)) as client:
            first = await client.post("/v1/completions", json=body, headers=_bearer(ALICE))
            used = first.json()["usage"]["total_tokens"]
            second = await client.post("/v1/completions", json=body, headers=_bearer(ALICE))
        assert first.status_code == 200
        assert 55 <= int(first.headers["x-ratelimit-remaining-tokens"]) <= 59  # 91 taken
        assert used < 40  # a stop string ended it early: most of the reservation went back
        assert second.status_code == 200, second.text

    async def test_max_parallel_by_construction(self, make_settings: SettingsFactory) -> None:
        """max_parallel = 1 with a request held in the member: the next one from the same
        key is a 429 parallel_limit_exceeded at once; another key is served; released, the
        key is free again."""
        settings = make_settings(
            cache={"enabled": False}, auth={"keys": _keys(alice={"max_parallel": 1})}
        )
        app = create_app(settings)
        async with serving(app) as client:
            slot = app.state.ensemble.slots["demo-tiny"]
            previous = slot.active
            gated = GatedEngine(LlamaEngine.load(slot.spec))
            slot.install(gated)
            await previous.close()
            held: list[httpx.Response] = []

            async def hold() -> None:
                answer = await client.post("/v1/completions", json=BODY, headers=_bearer(ALICE))
                held.append(answer)

            async with anyio.create_task_group() as group:
                group.start_soon(hold)
                with anyio.fail_after(30):
                    while not gated.arrived.is_set():
                        await anyio.sleep(0.01)
                elsewhere = BODY | {"model": "demo-small"}
                refused = await client.post(
                    "/v1/completions", json=elsewhere, headers=_bearer(ALICE)
                )
                other = await client.post("/v1/completions", json=elsewhere, headers=_bearer(BOB))
                gated.release.set()
            after = await client.post("/v1/completions", json=BODY, headers=_bearer(ALICE))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "parallel_limit_exceeded"
        assert refused.headers["retry-after"] == "1"
        assert (other.status_code, held[0].status_code, after.status_code) == (200, 200, 200)

    async def test_health_shows_where_limits_are_counted(
        self, make_settings: SettingsFactory
    ) -> None:
        settings = make_settings(auth={"keys": _keys(alice={"rpm": 60})})
        async with serving(create_app(settings)) as client:
            health = (await client.get("/health/llm/all")).json()
        assert health["limits"] == {"backend": "memory", "status": "healthy"}
        async with serving(create_app(make_settings())) as client:
            plain = (await client.get("/health/llm/all")).json()
        assert "limits" not in plain


class TestSecrets:
    async def test_no_key_in_spans_or_error_bodies(
        self,
        make_settings: SettingsFactory,
        provider: TracerProvider,
        exporter: InMemorySpanExporter,
    ) -> None:
        """With content capture on, the spans of keyed, wrong-keyed and refused requests
        hold no key anywhere (names, attributes, events)."""
        settings = make_settings(
            tracing={"capture_content": True}, auth={"keys": _keys(alice={"rpm": 12})}
        )
        bodies = []
        async with serving(create_app(settings, tracer_provider=provider)) as client:
            for headers in (_bearer(ALICE), {"X-Api-Key": BOB}, _bearer(ALICE + "x")):
                answer = await client.post("/v1/completions", json=BODY, headers=headers)
                bodies.append(answer.text)
            for _ in range(2):  # over the limit
                answer = await client.post("/v1/completions", json=BODY, headers=_bearer(ALICE))
                bodies.append(answer.text)
        spans = exporter.get_finished_spans()
        assert spans
        dumped = "".join(span.to_json() for span in spans) + "".join(bodies)
        for secret in (ALICE, BOB, ALICE[3:], BOB[3:]):
            assert secret not in dumped
