"""schemathesis against a live server: generated requests, zero 5xx, zero schema breaks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ..conftest import process_env
from ..processes import launch

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("ENSEMBLE_OPS_FUZZ_EXAMPLES", "20"))
"""Per operation and phase; 20 makes a few hundred requests. `nox -s fuzz` raises it."""


def run_schemathesis(url: str, examples: int, report: Path) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "schemathesis"
    if not binary.exists() and shutil.which("schemathesis") is None:
        pytest.fail("schemathesis is not installed (it is a test dependency)")
    return subprocess.run(
        [
            str(binary if binary.exists() else "schemathesis"),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            # A request can match the schema and still be refused: a prompt too long for
            # n_ctx (400) or a reload already running (409). Those are documented answers.
            "--exclude-checks",
            "positive_data_acceptance",
            # The event stream never ends by itself (its own tests are in test_events.py).
            "--exclude-path",
            "/events",
            "--max-examples",
            str(examples),
            "--workers",
            "1",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=report.parent,
    )


def _fuzz(tmp_path: Path, members: dict[str, Path], examples: int, n_ctx: int = 256) -> None:
    """Serve ``members`` and fuzz every operation: no 5xx, no answer outside the schema, no
    error in the server's log, and every member still healthy afterwards (no request can
    poison one). A small context bounds the longest generation a request can ask for, and
    short mode presets the ones that ask for none."""
    config = tmp_path / "fuzz.toml"
    config.write_text(
        "".join(
            f'[[models]]\nname = "{name}"\npath = "{path}"\nn_ctx = {n_ctx}\nqueue_size = 4\n'
            for name, path in members.items()
        )
        + "".join(f"[modes.{mode}]\nmax_tokens = 8\n" for mode in ("fast", "balanced", "creative"))
    )
    server = launch(tmp_path, process_env(), "--config", str(config), "--log-level", "warning")
    try:
        result = run_schemathesis(server.url, examples, tmp_path / "report")
        health = httpx.get(f"{server.url}/health/llm/all", timeout=30).json()
    finally:
        assert server.stop() == 0
    summary = result.stdout[result.stdout.find("SUMMARY") :]
    assert result.returncode == 0, summary or result.stdout[-3000:] + result.stderr
    assert " passed" in summary
    assert "failed" not in summary
    crashes = [line for line in server.log_lines() if line.get("level") == "error"]
    assert crashes == []
    assert health["models"] == dict.fromkeys(members, "healthy")


class TestFuzz:
    def test_generated_requests(self, tmp_path: Path, demo_dir: Path) -> None:
        """Every generated request to a demo member gets a documented answer, never a 5xx."""
        _fuzz(tmp_path, {"demo-tiny": demo_dir / "demo-tiny.gguf"}, EXAMPLES)

    @pytest.mark.real_models
    def test_generated_requests_to_the_real_ensemble(
        self, tmp_path: Path, real_paths: dict[str, Path]
    ) -> None:
        """The same on the default ensemble's real models (their tokenizers see the fuzzed
        prompts: empty ones, control characters, any code point)."""
        _fuzz(tmp_path, real_paths, max(EXAMPLES // 4, 3), n_ctx=96)
