"""schemathesis against a live server: generated requests, zero 5xx, zero schema breaks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


class TestFuzz:
    def test_generated_requests(self, tmp_path: Path, demo_dir: Path) -> None:
        """Every generated request gets a documented answer, never a 5xx."""
        config = tmp_path / "fuzz.toml"
        config.write_text(
            f'[[models]]\nname = "demo-tiny"\npath = "{demo_dir / "demo-tiny.gguf"}"\n'
            "n_ctx = 512\nqueue_size = 4\n"
        )
        env = process_env()
        server = launch(tmp_path, env, "--config", str(config), "--log-level", "warning")
        try:
            result = run_schemathesis(server.url, EXAMPLES, tmp_path / "report")
        finally:
            assert server.stop() == 0
        summary = result.stdout[result.stdout.find("SUMMARY") :]
        assert result.returncode == 0, summary or result.stdout[-3000:] + result.stderr
        assert " passed" in summary
        assert "failed" not in summary
        crashes = [line for line in server.log_lines() if line.get("level") == "error"]
        assert crashes == []
