"""End to end: ``ensemble-ops serve`` as a real hypercorn process, driven over HTTP."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ..conftest import free_port, process_env
from ..processes import Server, launch, start_serve, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(name="server_env", scope="module")
def _server_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("cache")
    env = process_env()
    return env | {"XDG_CACHE_HOME": str(cache)}


@pytest.fixture(name="server", scope="module")
def _server(
    tmp_path_factory: pytest.TempPathFactory, server_env: dict[str, str]
) -> Iterator[Server]:
    """The generated demo ensemble, as ``ensemble-ops serve --demo`` starts it."""
    server = launch(tmp_path_factory.mktemp("server"), server_env, "--demo")
    yield server
    assert server.stop() == 0


@pytest.fixture(name="oai")
def _oai(server: Server) -> Iterator[openai.OpenAI]:
    # Closed after each test: an open client's socket would be reported unclosed later.
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


class TestOpenAIClient:
    def test_completion(self, oai: openai.OpenAI) -> None:
        """The official client gets a completion from a named member."""
        result = oai.completions.create(model="demo-tiny", prompt="Hello", max_tokens=7)
        assert result.model == "demo-tiny"
        assert result.choices[0].text.strip()
        assert result.usage is not None
        assert result.usage.completion_tokens == 7

    def test_chat_completion_through_the_ensemble(self, oai: openai.OpenAI) -> None:
        """model="ensemble" with a mode answers from that mode's preferred member."""
        result = oai.chat.completions.create(
            model="ensemble",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            extra_body={"mode": "creative"},
        )
        assert result.model == "demo-base"
        assert result.choices[0].message.content

    def test_streaming_chat(self, oai: openai.OpenAI) -> None:
        """Streaming chat arrives piece by piece and ends with a finish reason."""
        stream = oai.chat.completions.create(
            model="demo-small",
            messages=[{"role": "user", "content": "Tell me"}],
            max_tokens=12,
            stream=True,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) > 3
        assert text.strip()
        assert chunks[-1].choices[0].finish_reason == "length"

    def test_streaming_completion(self, oai: openai.OpenAI) -> None:
        """Streaming completions too."""
        stream = oai.completions.create(model="demo-base", prompt="Once", max_tokens=6, stream=True)
        pieces = [c.choices[0].text for c in stream]
        assert "".join(pieces).strip()

    def test_errors_reach_the_client_typed(self, oai: openai.OpenAI) -> None:
        """OpenAI-shaped errors become the client's own exception types."""
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            oai.completions.create(model="nope", prompt="x", max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="context length"):
            oai.completions.create(model="demo-tiny", prompt="x " * 3000, max_tokens=1)

    def test_models(self, oai: openai.OpenAI) -> None:
        """The client lists the routing entry and the three demo members."""
        assert [m.id for m in oai.models.list()] == [
            "ensemble",
            "demo-tiny",
            "demo-small",
            "demo-base",
        ]


class TestUnderLoad:
    def test_models_and_probes_answer_while_every_member_generates(self, server: Server) -> None:
        """/v1/models and the health probes return while all three members generate: two
        clients per member keep a long stream open at all times, and the metrics answered
        in the same window show every member with requests in flight."""
        members = ("demo-tiny", "demo-small", "demo-base")
        stop = threading.Event()
        streaming = {member: threading.Event() for member in members}

        def generate(member: str) -> None:
            body = {"model": member, "prompt": "Go", "max_tokens": 2000, "stream": True}
            while not stop.is_set():
                with httpx.stream(
                    "POST", f"{server.url}/v1/completions", json=body, timeout=120
                ) as response:
                    for _ in response.iter_lines():
                        streaming[member].set()
                        if stop.is_set():
                            break

        threads = [threading.Thread(target=generate, args=(m,)) for m in members * 2]
        for thread in threads:
            thread.start()
        try:
            assert all(event.wait(60) for event in streaming.values())
            paths = ["/v1/models", "/health/live", "/health/ready", "/health/llm/all"]
            answers = {path: httpx.get(f"{server.url}{path}", timeout=30) for path in paths}
            metrics = httpx.get(f"{server.url}/health/metrics/json", timeout=30).json()
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
        assert {path: r.status_code for path, r in answers.items()} == dict.fromkeys(paths, 200)
        assert answers["/health/llm/all"].json()["healthy_count"] == 3
        in_flight = {m: metrics[f"llm_active_requests_model={m}"] for m in members}
        assert all(count >= 1 for count in in_flight.values()), in_flight

    def test_disconnect_mid_stream_frees_the_member(self, server: Server) -> None:
        """A client that leaves mid-stream stops its generation; the member serves on."""
        body = {"model": "demo-base", "prompt": "Go", "max_tokens": 2000, "stream": True, "seed": 1}
        request_id = f"leaver-{time.time_ns()}"
        with httpx.stream(
            "POST",
            f"{server.url}/v1/completions",
            json=body,
            timeout=60,
            headers={"X-Request-ID": request_id},
        ) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(line for line in lines if line.startswith("data:"))
        after = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "demo-base", "prompt": "Next", "max_tokens": 4},
            timeout=60,
        )
        assert after.status_code == 200
        deadline = time.monotonic() + 10
        cancelled: list[dict[str, Any]] = []
        while not cancelled and time.monotonic() < deadline:
            cancelled = [
                line
                for line in server.log_lines()
                if line["event"] == "inference.cancelled" and line.get("request_id") == request_id
            ]
            time.sleep(0.1)
        assert cancelled, "no inference.cancelled line for the stream that was left"
        assert 3 <= cancelled[0]["completion_tokens"] < 1000


class TestLogs:
    def test_one_json_line_per_request(self, server: Server) -> None:
        """stdout is JSON lines; each request has one line with the fields operators filter on."""
        httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "demo-tiny", "prompt": "log me", "max_tokens": 3},
            headers={"X-Request-ID": "trace-42"},
        )
        time.sleep(0.2)
        lines = [line for line in server.log_lines() if line.get("request_id") == "trace-42"]
        requests = [line for line in lines if line["event"] == "request"]
        assert len(requests) == 1
        line = requests[0]
        assert line["status"] == 200
        assert line["model"] == "demo-tiny"
        assert line["mode"] == "balanced"
        assert line["completion_tokens"] == 3
        assert line["latency_ms"] > 0
        access = [line for line in lines if line["logger"] == "hypercorn.access"]
        assert len(access) == 1
        assert "POST /v1/completions" in access[0]["event"]
        assert server.stderr.read_text() == ""


class TestProcess:
    def test_sigterm_lets_in_flight_requests_finish(
        self, tmp_path: Path, server_env: dict[str, str]
    ) -> None:
        """SIGTERM: in-flight requests complete, new connections are refused, exit 0."""
        # A shutdown timeout no machine's speed can reach: the request finishes by itself.
        env = server_env | {"ENSEMBLE_OPS_SERVER__SHUTDOWN_TIMEOUT_S": "600"}
        server = launch(tmp_path, env, "--demo")
        results: dict[str, Any] = {}

        def long_request() -> None:
            body = {"model": "demo-base", "prompt": "Go", "max_tokens": 1500, "stream": True}
            with httpx.stream(
                "POST", f"{server.url}/v1/completions", json=body, timeout=120
            ) as response:
                lines = response.iter_lines()
                next(line for line in lines if line.startswith("data:"))
                results["streaming"] = True
                results["last"] = [line for line in lines if line][-1]

        thread = threading.Thread(target=long_request)
        thread.start()
        while "streaming" not in results and thread.is_alive():
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        thread.join(timeout=300)
        assert results["last"] == "data: [DONE]"
        assert server.process.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/v1/models")
        events = [line["event"] for line in server.log_lines()]
        assert events.index("model.unloaded") > events.index("request")

    def test_sigterm_fails_readiness_and_serves_through_the_drain_delay(
        self, tmp_path: Path, server_env: dict[str, str]
    ) -> None:
        """SIGTERM with a drain delay: readiness answers 503 "shutting down" at once while
        liveness stays 200 and requests are still answered; after the delay the process
        stops accepting and exits 0."""
        env = server_env | {"ENSEMBLE_OPS_SERVER__DRAIN_DELAY_S": "3"}
        server = launch(tmp_path, env, "--demo")
        server.process.send_signal(signal.SIGTERM)
        ready = _until(lambda: httpx.get(f"{server.url}/health/ready", timeout=5), 503)
        assert ready.json() == {"status": "not_ready", "reason": "shutting down"}
        assert httpx.get(f"{server.url}/health/live", timeout=5).status_code == 200
        body = {"model": "demo-tiny", "prompt": "Still there?", "max_tokens": 4}
        answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert answer.status_code == 200
        assert server.process.poll() is None  # still serving after SIGTERM
        assert server.process.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/v1/models")
        lines = server.log_lines()
        events = [line["event"] for line in lines]
        draining = next(line for line in lines if line["event"] == "server.draining")
        assert (draining["signal"], draining["drain_delay_s"]) == ("SIGTERM", 3.0)
        assert events.index("server.draining") < events.index("server.stopped")

    def test_sigterm_while_models_load_exits_0(
        self, tmp_path: Path, server_env: dict[str, str], demo_dir: Path
    ) -> None:
        """SIGTERM before every member has loaded is a clean stop (exit 0), not "no model
        loaded": the members the shutdown unloaded did not fail."""
        # Six members on the largest demo file load one after another for a few seconds.
        config = tmp_path / "slow.toml"
        config.write_text(
            "".join(
                f'[[models]]\nname = "m{i}"\npath = "{demo_dir / "demo-base.gguf"}"\nn_ctx = 256\n'
                for i in range(6)
            )
        )
        stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
        env = server_env | {"ENSEMBLE_OPS_SERVER__DRAIN_DELAY_S": "0"}
        server = start_serve(stdout, stderr, env, free_port(), "--config", str(config))
        wait_until(lambda: _answers(f"{server.url}/health/live"), 60, "the server to listen")
        states = [
            m["meta"]["state"] for m in httpx.get(f"{server.url}/v1/models").json()["data"][1:]
        ]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, stderr.read_text() + stdout.read_text()
        assert "loading" in states  # the signal came while members were loading
        events = [line["event"] for line in server.log_lines()]
        assert "ensemble.no_model_loaded" not in events

    def test_a_second_sigterm_skips_the_drain_delay(
        self, tmp_path: Path, server_env: dict[str, str]
    ) -> None:
        """A second SIGTERM during a long drain delay stops the server now (exit 0)."""
        env = server_env | {"ENSEMBLE_OPS_SERVER__DRAIN_DELAY_S": "600"}
        server = launch(tmp_path, env, "--demo")
        server.process.send_signal(signal.SIGTERM)
        _until(lambda: httpx.get(f"{server.url}/health/ready", timeout=5), 503)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        assert "server.stopping_now" in [line["event"] for line in server.log_lines()]

    def test_log_file_and_console_format(self, tmp_path: Path, server_env: dict[str, str]) -> None:
        """--log-file writes the JSON lines to a file instead of stdout."""
        log_file = tmp_path / "ops.log"
        server = launch(tmp_path, server_env, "--demo", "--log-file", str(log_file))
        assert server.stop() == 0
        assert server.stdout.read_text() == ""
        events = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
        assert "ensemble.starting" in events
        assert "server.stopped" in events


class TestReload:
    def test_cli_reload_with_progress(self, server: Server, server_env: dict[str, str]) -> None:
        """`ensemble-ops reload --wait` follows the reload to completed and exits 0."""
        done = _cli(server_env, "reload", "demo-tiny", "--admin-url", server.admin_url, "--wait")
        assert done.returncode == 0, done.stderr
        assert "100.0% completed" in done.stderr
        assert "reload of demo-tiny completed" in done.stderr
        refused = _cli(
            server_env,
            "reload",
            "demo-tiny",
            "--admin-url",
            server.admin_url,
            "--path",
            "/etc/hostname",
            "--wait",
        )
        assert refused.returncode == 1
        assert "outside the model directory" in refused.stderr

    def test_cli_finds_a_unix_socket_admin_listener_from_the_config(
        self, tmp_path: Path, server_env: dict[str, str]
    ) -> None:
        """An admin listener on a Unix socket (mode 600): the CLI finds it from a config
        holding only ``[server]`` (no models: a host without the model files), and the
        public port answers the admin routes 404, which the CLI explains."""
        socket_path = tmp_path / "admin.sock"
        server = launch(tmp_path, server_env, "--demo", "--admin-bind", f"unix:{socket_path}")
        try:
            assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
            listening = next(
                line for line in server.log_lines() if line["event"] == "server.listening"
            )
            assert listening["admin"] == f"unix:{socket_path}"
            config = tmp_path / "admin-only.toml"
            config.write_text(f'[server]\nadmin_bind = "unix:{socket_path}"\n')
            env = server_env  # no ENSEMBLE_OPS_* variables: the config alone says where
            done = _cli(env, "reload", "demo-tiny", "--config", str(config), "--wait")
            assert done.returncode == 0, done.stderr
            assert "reload of demo-tiny completed" in done.stderr
            public = _cli(env, "reload", "demo-tiny", "--admin-url", server.url)
            assert public.returncode == 1
            assert "404: Not Found (is" in public.stderr, public.stderr
            nothing = _cli(env, "abort", "demo-tiny", "--admin-url", "unix:/nonexistent.sock")
            assert nothing.returncode == 1
            assert "cannot reach unix:/nonexistent.sock" in nothing.stderr
        finally:
            assert server.stop() == 0

    def test_cli_canary_shows_weight_and_gates_and_promotes_under_load(
        self, server: Server, server_env: dict[str, str]
    ) -> None:
        """`ensemble-ops reload M --canary 20,60 --wait` against a real server under load:
        the live line shows each step's weight and the gates, it ends completed (exit 0),
        and every request of the load was answered."""
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                n = 0
                while not stop.is_set():
                    n += 1
                    body = {
                        "model": "demo-tiny",
                        "prompt": f"load {n}",
                        "max_tokens": 4,
                        "temperature": 0.9,
                    }
                    statuses.append(client.post("/v1/completions", json=body).status_code)

        clients = [threading.Thread(target=load) for _ in range(3)]
        for client in clients:
            client.start()
        try:
            done = _cli(
                server_env,
                "reload",
                "demo-tiny",
                "--admin-url",
                server.admin_url,
                "--canary",
                "20,60",
                "--min-requests",
                "5",
                "--min-seconds",
                "0.3",
                "--wait",
            )
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=60)
        # Identical copies on a busy machine: a latency gate may see noise and roll back;
        # what must hold is that it ran its steps live and no request failed.
        assert "weight  20.0%" in done.stderr, done.stderr
        assert "error_rate=" in done.stderr
        # Not a terminal: one line per change, no bar redrawn with carriage returns.
        assert "\r" not in done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == len(set(lines)), done.stderr
        assert set(statuses) == {200}
        assert done.returncode == 0 or "rolled back: gate failed" in done.stderr, done.stderr
        decided = _cli(server_env, "promote", "demo-tiny", "--admin-url", server.admin_url)
        assert decided.returncode == 1
        assert "No rollout of 'demo-tiny' is running" in decided.stderr

    def test_sighup_reloads_changed_members(
        self, tmp_path: Path, server_env: dict[str, str], demo_dir: Path
    ) -> None:
        """SIGHUP re-reads the config: a changed member reloads; a broken file changes nothing."""
        config = tmp_path / "ensemble.toml"

        def write(n_ctx: int, extra: str = "") -> None:
            config.write_text(
                "".join(
                    f'[[models]]\nname = "{name}"\npath = "{demo_dir / (name + ".gguf")}"\n'
                    f"n_ctx = {n_ctx if name == 'demo-tiny' else 512}\n"
                    for name in ("demo-tiny", "demo-small")
                )
                + extra
            )

        write(512)
        server = launch(tmp_path, server_env, "--config", str(config))
        try:
            write(1024)
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            status: dict[str, Any] = {}
            while time.monotonic() < deadline and status.get("state") != "completed":
                status = httpx.get(f"{server.url}/health/llm/reload/demo-tiny").json()
                time.sleep(0.1)
            assert status["state"] == "completed"
            models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
            assert models["demo-tiny"]["meta"]["n_ctx"] == 1024
            small = httpx.get(f"{server.url}/health/llm/reload/demo-small").json()
            assert small["state"] == "idle"  # unchanged: not reloaded

            write(2048, extra="[server]\nbogus = 1\n")
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            failed: list[dict[str, Any]] = []
            while time.monotonic() < deadline and not failed:
                failed = [e for e in server.log_lines() if e["event"] == "config.reread_failed"]
                time.sleep(0.1)
            assert failed
            assert "server.bogus: unknown key" in failed[0]["error"]
            models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
            assert models["demo-tiny"]["meta"]["n_ctx"] == 1024
        finally:
            assert server.stop() == 0


def _until(ask: Callable[[], httpx.Response], status: int) -> httpx.Response:
    """Ask until the answer has ``status`` (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        answer = ask()
        if answer.status_code == status or time.monotonic() > deadline:
            assert answer.status_code == status, answer.text
            return answer
        time.sleep(0.05)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``ensemble-ops ARGS`` as a user runs it (output captured, 120 s at most)."""
    command = [sys.executable, "-m", "ensemble_ops", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False
