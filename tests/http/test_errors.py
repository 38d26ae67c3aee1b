"""Errors render from what each error carries: one table for HTTP and for the metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from ensemble_ops import errors
from ensemble_ops.http.app import create_app

from ..conftest import AppClient, SettingsFactory, serving

COMPLETION = {"model": "demo-tiny", "prompt": "Hello", "max_tokens": 4}


def _error(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


class TestTable:
    def test_every_error_has_its_own_code(self) -> None:
        """No two error classes share a code and type (OpenAI's rate_limit_exceeded is one
        code, told apart by its type: requests or tokens), and each 503 says when to retry."""
        classes = [
            cls
            for cls in vars(errors).values()
            if isinstance(cls, type) and issubclass(cls, errors.EnsembleOpsError)
        ]
        codes = [(cls.code, cls.error_type) for cls in classes]
        assert len(codes) == len(set(codes))
        overloaded = errors.OverloadedError("m", 1, retry_after_s=7)
        assert overloaded.retry_after_s == 7  # from the member's measured rate
        late = errors.DeadlineUnreachableError("m", target_s=2.5, wait_s=6.1)
        assert late.retry_after_s == 4  # the wait beyond the target, rounded up
        measured = {errors.OverloadedError: overloaded, errors.DeadlineUnreachableError: late}
        for cls in classes:
            retry = measured[cls].retry_after_s if cls in measured else cls.retry_after_s
            assert (cls.status == 503) == (retry is not None and cls.status != 409)

    def test_unexpected_exceptions_are_internal_errors(self) -> None:
        """Anything not raised on purpose is labelled internal_error."""
        assert errors.error_code(ValueError("x")) == "internal_error"
        assert errors.error_code(errors.OverloadedError("m", 1)) == "overloaded"


class TestRendering:
    async def test_context_length_error_names_max_tokens(self, client: AppClient) -> None:
        """The error's own param reaches the client: max_tokens, on completions and chat."""
        completion = await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 2045})
        chat = await client.post(
            "/v1/chat/completions",
            json={
                "model": "demo-tiny",
                "max_tokens": 2045,
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        for response in (completion, chat):
            assert response.status_code == 400
            assert _error(response)["code"] == "context_length_exceeded"
            assert _error(response)["param"] == "max_tokens"

    async def test_no_member_is_named_the_same_in_http_and_metrics(
        self, make_settings: SettingsFactory, tmp_path: Path
    ) -> None:
        """When no member can serve, HTTP and llm_errors_total both say no_member_available."""
        broken = tmp_path / "broken.gguf"
        broken.write_bytes(b"GGUF" + b"\0" * 64)
        settings = make_settings(
            models=[{"name": n, "path": str(broken)} for n in ("broken-a", "broken-b")]
        )
        async with serving(app := create_app(settings)) as client:
            response = await client.post(
                "/v1/completions", json={"model": "ensemble", "prompt": "x"}
            )
            flat = app.state.metrics.flat()
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert _error(response)["code"] == "no_member_available"
        assert flat["llm_errors_total_model=ensemble,error_type=no_member_available"] == 1

    @pytest.mark.parametrize("path", ["a\u0000b", "\u0000", "models/\u0000.gguf"])
    async def test_a_nul_byte_in_a_reload_path_is_a_400(self, client: AppClient, path: str) -> None:
        """A path the OS cannot even look at is the client's mistake, named, never a 500."""
        response = await client.admin.post("/admin/models/demo-tiny/reload", json={"path": path})
        assert response.status_code == 400
        assert _error(response)["param"] == "path"
        status = await client.get("/health/llm/reload/demo-tiny")
        assert status.json()["state"] == "idle"

    async def test_a_reload_during_a_reload_is_a_409_with_the_running_status(
        self, client: AppClient
    ) -> None:
        """409 reload_in_progress with Retry-After and the running reload's status."""
        first = await client.admin.post("/admin/models/demo-base/reload")
        second = await client.admin.post("/admin/models/demo-base/reload")
        assert first.status_code == 202
        assert second.status_code == 409
        assert second.headers["retry-after"] == "5"
        assert _error(second)["code"] == "reload_in_progress"
        assert second.json()["status"]["model"] == "demo-base"
        assert second.json()["status"]["state"] in ("warming_up", "ready", "switching")
