"""The command line, run as a user runs it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from ensemble_ops import __version__


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ensemble_ops", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


class TestCli:
    def test_version(self) -> None:
        """--version prints the package version."""
        result = _run("--version")
        assert result.returncode == 0
        assert result.stdout.strip() == f"ensemble-ops {__version__}"

    def test_demo_models_writes_the_demo_files(self, tmp_path: Path, demo_dir: Path) -> None:
        """demo-models DIR writes the same three files that serve uses."""
        result = _run("demo-models", str(tmp_path))
        assert result.returncode == 0
        names = ["demo-tiny.gguf", "demo-small.gguf", "demo-base.gguf"]
        assert result.stdout.split() == [str(tmp_path / n) for n in names]
        for name in names:
            digest = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
            assert digest == hashlib.sha256((demo_dir / name).read_bytes()).hexdigest()

    def test_bad_config_exits_2_with_one_line(
        self, tmp_path: Path, clean_env: dict[str, str]
    ) -> None:
        """A config error is one line on stderr naming the key, exit status 2."""
        config = tmp_path / "bad.toml"
        config.write_text('[[models]]\nname = "a"\npath = "missing.gguf"\n')
        result = _run("serve", "--config", str(config), env=clean_env)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("ensemble-ops: config error: models[0].path: GGUF file not")

    def test_bad_flag_value_is_a_config_error(
        self, tmp_path: Path, clean_env: dict[str, str]
    ) -> None:
        """--port goes through the same validation as the config file."""
        env = clean_env | {"XDG_CACHE_HOME": str(tmp_path)}
        result = _run("serve", "--port", "99999", env=env)
        assert result.returncode == 2
        assert "server.port" in result.stderr
