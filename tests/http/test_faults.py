"""Fault injection with real processes and real models: nothing lost, every request answered."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ensemble_ops.serving.demo import DemoModel, write_model

from ..conftest import process_env
from ..processes import Server, launch

pytestmark = pytest.mark.e2e


def _env() -> dict[str, str]:
    return process_env()


def _config(path: Path, members: list[tuple[str, Path, str]]) -> Path:
    path.write_text(
        "".join(
            f'[[models]]\nname = "{name}"\npath = "{file}"\nn_ctx = 512\n{extra}\n'
            for name, file, extra in members
        )
    )
    return path


def _wait_reload(server: Server, model: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status: dict[str, Any] = httpx.get(f"{server.url}/health/llm/reload/{model}").json()
        if status["state"] in ("completed", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"reload of {model} did not finish")


@pytest.fixture(name="model_dir")
def _model_dir(tmp_path: Path, demo_dir: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    for name in ("demo-tiny", "demo-small", "demo-base"):
        shutil.copy(demo_dir / f"{name}.gguf", directory / f"{name}.gguf")
    return directory


class TestMissingFileAtStartup:
    def test_optional_member_missing_then_loaded_by_reload(
        self, tmp_path: Path, model_dir: Path
    ) -> None:
        """An optional member's missing file: it is unhealthy, the rest serve, readiness 200;
        once the file is there, a reload brings it in."""
        late = model_dir / "late.gguf"
        config = _config(
            tmp_path / "e.toml",
            [
                ("demo-tiny", model_dir / "demo-tiny.gguf", ""),
                ("late", late, "optional = true"),
            ],
        )
        server = launch(tmp_path, _env(), "--config", str(config))
        try:
            health = httpx.get(f"{server.url}/health/llm", params={"model": "late"})
            assert health.status_code == 503
            assert "file not found" in health.json()["error_message"]
            assert httpx.get(f"{server.url}/health/ready").status_code == 200
            served = httpx.post(
                f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30
            )
            assert served.json()["model"] == "demo-tiny"
            named = httpx.post(
                f"{server.url}/v1/completions", json={"model": "late", "prompt": "x"}, timeout=30
            )
            assert named.status_code == 503
            assert "retry-after" in named.headers

            shutil.copy(model_dir / "demo-tiny.gguf", late)
            assert httpx.post(f"{server.admin_url}/admin/models/late/reload").status_code == 202
            assert _wait_reload(server, "late")["state"] == "completed"
            health = httpx.get(f"{server.url}/health/llm", params={"model": "late"})
            assert health.json()["status"] == "healthy"
        finally:
            assert server.stop() == 0


class TestBadFilesOnReload:
    @pytest.fixture(name="server")
    def _server(self, tmp_path: Path, model_dir: Path) -> Iterator[Server]:
        config = _config(tmp_path / "e.toml", [("demo-small", model_dir / "demo-small.gguf", "")])
        server = launch(tmp_path, _env(), "--config", str(config))
        yield server
        assert server.stop() == 0

    def test_corrupt_truncated_and_wrong_architecture_are_refused(
        self, server: Server, model_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Each bad file is refused before anything loads; traffic flows and never fails."""
        good = (model_dir / "demo-small.gguf").read_bytes()
        (model_dir / "corrupt.gguf").write_bytes(b"GGUF" + os.urandom(4096))
        (model_dir / "truncated.gguf").write_bytes(good[: len(good) // 2])
        import gguf

        real = gguf.GGUFWriter
        monkeypatch.setattr(
            gguf, "GGUFWriter", lambda path, arch, **kw: real(path, "no-such-arch", **kw)
        )
        write_model(DemoModel("odd", 64, 1, 64, 4, seed=9), model_dir / "wrong-arch.gguf")

        codes: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    codes.append(
                        client.post(
                            f"{server.url}/v1/completions",
                            json={"model": "demo-small", "prompt": "x", "max_tokens": 4},
                        ).status_code
                    )

        user = threading.Thread(target=traffic)
        user.start()
        try:
            for name, reason in (
                ("corrupt.gguf", "corrupt"),
                ("truncated.gguf", "corrupt"),
                ("wrong-arch.gguf", "unsupported architecture"),
            ):
                answer = httpx.post(
                    f"{server.admin_url}/admin/models/demo-small/reload", json={"path": name}
                )
                assert answer.status_code == 400, name
                assert reason in answer.json()["error"]["message"], name
            time.sleep(0.5)
        finally:
            stop.set()
            user.join()
        assert codes
        assert set(codes) == {200}
        status = httpx.get(f"{server.url}/health/llm/reload/demo-small").json()
        assert status["state"] == "idle"  # nothing was started

    def test_file_corrupted_after_config_edit_rolls_back(
        self, server: Server, model_dir: Path, tmp_path: Path
    ) -> None:
        """A config edit pointing at a truncated file: SIGHUP's reload fails, the old serves."""
        good = (model_dir / "demo-small.gguf").read_bytes()
        (model_dir / "half.gguf").write_bytes(good[: len(good) // 2])
        before = httpx.get(f"{server.url}/v1/models").json()["data"][1]["meta"]["generation"]
        _config(tmp_path / "e.toml", [("demo-small", model_dir / "half.gguf", "")])
        server.process.send_signal(signal.SIGHUP)
        status = _wait_reload(server, "demo-small")
        assert status["state"] == "failed"
        assert "corrupt or truncated" in status["error"]
        after = httpx.get(f"{server.url}/v1/models").json()["data"][1]["meta"]
        assert after["generation"] == before
        served = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "demo-small", "prompt": "x", "max_tokens": 2},
        )
        assert served.status_code == 200


class TestOverloadAndSlowClients:
    @pytest.fixture(name="server")
    def _server(self, tmp_path: Path, model_dir: Path) -> Iterator[Server]:
        config = _config(
            tmp_path / "e.toml",
            [
                ("demo-base", model_dir / "demo-base.gguf", "queue_size = 1\nparallel = 1"),
                ("demo-small", model_dir / "demo-small.gguf", ""),
            ],
        )
        server = launch(tmp_path, _env(), "--config", str(config))
        yield server
        assert server.stop() == 0

    def test_queue_overflow_is_503_never_a_hang_or_reset(self, server: Server) -> None:
        """Six at once on a member that takes two: two answers, four 503 + Retry-After."""
        results: list[httpx.Response] = []
        lock = threading.Lock()

        def send() -> None:
            answer = httpx.post(
                f"{server.url}/v1/completions",
                timeout=60,
                json={"model": "demo-base", "prompt": "x", "max_tokens": 300},
            )
            with lock:
                results.append(answer)

        threads = [threading.Thread(target=send) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert sorted(r.status_code for r in results) == [200, 200, 503, 503, 503, 503]
        for rejected in (r for r in results if r.status_code == 503):
            assert rejected.headers["retry-after"] == "1"
            assert rejected.json()["error"]["code"] == "overloaded"

    def test_slow_reader_does_not_hold_the_model(self, server: Server) -> None:
        """A client reading a stream slowly: the member finishes it and serves others."""
        timeline: dict[str, float] = {}
        lines: list[str] = []

        def slow_reader() -> None:
            body = {"model": "demo-small", "prompt": "x", "max_tokens": 200, "stream": True}
            with httpx.stream(
                "POST", f"{server.url}/v1/completions", json=body, timeout=120
            ) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        if len(lines) == 1:
                            timeline["first"] = time.monotonic()
                        time.sleep(0.01)  # about 2 s for the whole stream
            timeline["slow_done"] = time.monotonic()

        reader = threading.Thread(target=slow_reader)
        reader.start()
        while "first" not in timeline:
            time.sleep(0.01)
        time.sleep(0.3)  # the generation itself is done by now; the reader is not
        quick = httpx.post(
            f"{server.url}/v1/completions",
            timeout=60,
            json={"model": "demo-small", "prompt": "y", "max_tokens": 2},
        )
        timeline["quick_done"] = time.monotonic()
        reader.join(timeout=120)
        assert quick.status_code == 200
        assert timeline["quick_done"] < timeline["slow_done"]
        assert lines[-1] == "data: [DONE]"
        assert len(lines) > 150  # every piece arrived, however slowly it was read
