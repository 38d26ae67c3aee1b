"""The quality gate on the default ensemble's real models, under load.

A copy that answers fluently and wrongly (the generated ``demo-base``: random weights with a
ChatML template, so it passes the warm-up and keeps the chat capability) is rolled back by
the gate and nothing else; the member's own file passes; a canary whose copy passes is
promoted. Clients send requests throughout and none fails.
"""

from __future__ import annotations

import os
import shutil
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import pytest

from ensemble_ops.config import Settings
from ensemble_ops.events import QualityJudged, RolloutFinished
from ensemble_ops.http.app import create_app
from ensemble_ops.serving.builtin import real_settings
from ensemble_ops.serving.demo import DEMO_MEMBERS, write_model
from ensemble_ops.serving.real_models import REAL_MEMBERS, SMOLLM2_135M

from ..conftest import AppClient, Recorded, Traffic, serving, under_load

pytestmark = pytest.mark.real_models

INSTRUCT = SMOLLM2_135M.name
DEMO_BASE = next(m for m in DEMO_MEMBERS if m.name == "demo-base")


@pytest.fixture(name="model_dir", scope="module")
def _model_dir(tmp_path_factory: pytest.TempPathFactory, real_paths: dict[str, Path]) -> Path:
    """The real files and demo-base in one folder: reload paths must stay inside it."""
    directory = tmp_path_factory.mktemp("models")
    for path in real_paths.values():
        target = directory / path.name
        try:
            os.link(path, target)
        except OSError:  # another file system
            shutil.copyfile(path, target)
    write_model(DEMO_BASE, directory / DEMO_BASE.filename)
    return directory


@pytest.fixture(name="settings")
def _settings(model_dir: Path) -> Settings:
    return real_settings({m.name: model_dir / m.filename for m in REAL_MEMBERS}, environ={})


def _chat(i: int, n: int) -> dict[str, Any]:
    return {
        "model": INSTRUCT,
        "messages": [{"role": "user", "content": f"Say something, {i}/{n}."}],
        "max_tokens": 4,
        "temperature": 0.8,  # sampled: every request reaches an engine
    }


def _under_load(client: AppClient) -> AbstractAsyncContextManager[Traffic]:
    """Two clients sending chats to the instruct member."""
    return under_load(client, _chat, path="/v1/chat/completions", clients=2)


async def _reload(client: AppClient, body: dict[str, object]) -> dict[str, object]:
    started = await client.admin.post(f"/admin/models/{INSTRUCT}/reload", json=body)
    assert started.status_code == 202, started.text
    while True:
        status: dict[str, object] = (await client.get(f"/health/llm/reload/{INSTRUCT}")).json()
        if status["state"] in ("completed", "failed", "rolled_back"):
            return status
        await anyio.sleep(0.2)


class TestQualityGate:
    async def test_a_fluent_wrong_copy_is_rolled_back_and_its_own_file_passes(
        self, settings: Settings, model_dir: Path
    ) -> None:
        app = create_app(settings)
        events = Recorded(app.state.bus, QualityJudged)
        async with serving(app) as client:
            old = app.state.ensemble.slots[INSTRUCT].active
            async with _under_load(client) as traffic:
                bad = await _reload(client, {"path": DEMO_BASE.filename})
                assert app.state.ensemble.slots[INSTRUCT].active is old
                good = await _reload(client, {"path": SMOLLM2_135M.filename})
            assert app.state.ensemble.slots[INSTRUCT].active is not old
        # Rolled back by the gate, not by another check: the warm-up and capabilities passed.
        assert bad["state"] == "failed"
        assert str(bad["error"]).startswith("quality gate failed: passed "), bad["error"]
        quality = bad["quality"]
        assert isinstance(quality, dict)
        assert quality["verdict"] == "fail"
        assert quality["pass_rate"] < 0.7 <= quality["stable_pass_rate"]
        assert quality["golden_set"] == "chat.jsonl"
        failure = quality["failures"][0]
        assert set(failure) == {"case", "input", "expected", "got", "why"}
        assert failure["input"].startswith("user: ")
        # The member's own file passes; the serving copy was scored once.
        assert good["state"] == "completed", good
        assert isinstance(good["quality"], dict)
        assert good["quality"]["verdict"] == "pass"
        assert good["quality"]["pass_rate"] >= 0.7
        assert [e.copy for e in events.of(QualityJudged)] == ["candidate", "stable", "candidate"]
        assert len(traffic.statuses) > 10
        assert set(traffic.statuses) == {200}

    async def test_a_canary_whose_copy_passes_is_promoted(self, settings: Settings) -> None:
        app = create_app(settings)
        events = Recorded(app.state.bus, RolloutFinished)
        async with serving(app) as client, _under_load(client) as traffic:
            status = await _reload(
                client,
                {
                    "path": SMOLLM2_135M.filename,
                    "rollout": "canary",
                    "steps": [50],
                    "min_requests": 5,
                    "min_seconds": 0.5,
                    # The same weights differ only by noise: this test is the promotion.
                    "gates": {"max_p95_ratio": 5.0, "max_ttft_ratio": 5.0},
                },
            )
        assert status["state"] == "completed", status
        assert isinstance(status["quality"], dict)
        assert status["quality"]["verdict"] == "pass"
        assert [(e.rollout, e.outcome) for e in events.of(RolloutFinished)] == [
            ("canary", "promoted")
        ]
        assert set(traffic.statuses) == {200}
