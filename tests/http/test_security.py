"""API keys and the admin listener on a real ``ensemble-ops serve`` process: the official
OpenAI client with a key, malformed credentials on the wire, a stream left mid-way, the logs
of the run, and the start-up checks of ``server.admin_bind``."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ensemble_ops.access.keys import new_key

from ..conftest import process_env
from ..processes import Server, launch

pytestmark = pytest.mark.e2e

ALICE, ALICE_SHA = new_key()
BOB, BOB_SHA = new_key()
ADMIN_TOKEN = "admin-" + new_key()[0]


@pytest.fixture(name="server_env", scope="module")
def _server_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return process_env() | {"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}


def _config(demo_dir: Path) -> str:
    members = "".join(
        f'[[models]]\nname = "{name}"\npath = "{demo_dir / f"{name}.gguf"}"\nn_ctx = 512\n'
        for name in ("demo-tiny", "demo-small")
    )
    return (
        f'[server]\nadmin_token = "{ADMIN_TOKEN}"\n\n{members}'
        f'[[auth.keys]]\nname = "alice"\nkey_sha256 = "{ALICE_SHA}"\nmax_parallel = 1\n'
        f'[[auth.keys]]\nname = "bob"\nkey_sha256 = "{BOB_SHA}"\nrpm = 600\n'
    )


@pytest.fixture(name="server", scope="module")
def _server(
    tmp_path_factory: pytest.TempPathFactory, demo_dir: Path, server_env: dict[str, str]
) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("keyed")
    config = directory / "keyed.toml"
    config.write_text(_config(demo_dir))
    server = launch(directory, server_env, "--config", str(config))
    yield server
    assert server.stop() == 0


def _raw(server: Server, header: bytes) -> bytes:
    """A request with ``header`` written byte for byte, and the status line answered."""
    host, port = server.url.removeprefix("http://").split(":")
    body = b'{"model": "demo-tiny", "prompt": "x", "max_tokens": 1}'
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + header
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


class TestKeysOnTheWire:
    def test_the_openai_client_with_api_key(self, server: Server) -> None:
        """``openai.OpenAI(api_key=...)`` sends the key as a bearer token: served; a wrong
        key raises the client's own AuthenticationError."""
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=BOB, max_retries=0) as client:
            answer = client.completions.create(model="demo-tiny", prompt="Hi", max_tokens=3)
            chat = client.chat.completions.create(
                model="demo-small", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
            )
            models = [model.id for model in client.models.list()]
            raw = client.completions.with_raw_response.create(
                model="demo-tiny", prompt="Hi", max_tokens=1
            )
        assert answer.choices[0].text is not None
        assert chat.choices[0].message.role == "assistant"
        assert models == ["ensemble", "demo-tiny", "demo-small"]
        assert raw.headers["x-ratelimit-limit-requests"] == "600"
        with (
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="eo-wrong", max_retries=0) as bad,
            pytest.raises(openai.AuthenticationError) as refused,
        ):
            bad.completions.create(model="demo-tiny", prompt="Hi", max_tokens=3)
        assert refused.value.code == "invalid_api_key"

    @pytest.mark.parametrize(
        "header",
        [
            b"Authorization: Bearer",
            b"Authorization: Basic YWxpY2U6c2VjcmV0",
            b"Authorization: Bearer " + b"k" * 8192,
            b"Authorization: Bearer \xff\xfe\xc3\xa9",
            b"X-Api-Key: \xc3\xa9t\xc3\xa9",
        ],
        ids=["empty-bearer", "basic", "8kb", "non-ascii", "non-ascii-x-api-key"],
    )
    def test_malformed_credentials_are_4xx(self, server: Server, header: bytes) -> None:
        status = _raw(server, header)
        assert status.split()[1] in (b"400", b"401"), status
        assert httpx.get(f"{server.url}/health/live", timeout=10).status_code == 200

    def test_a_stream_left_mid_way_gives_its_place_back(self, server: Server) -> None:
        """alice may have one request in flight: a stream she leaves after its first chunk
        frees the place once the server sees her gone, so her next request is served."""
        headers = {"Authorization": f"Bearer {ALICE}"}
        body = {"model": "demo-small", "prompt": "Tell", "max_tokens": 400, "stream": True}
        with (
            httpx.Client(base_url=server.url, headers=headers, timeout=30) as client,
            client.stream("POST", "/v1/completions", json=body) as answer,
        ):
            assert answer.status_code == 200
            next(line for line in answer.iter_lines() if line.startswith("data:"))
        # The connection is closed; the server notices, cancels and settles.
        served = None
        for _ in range(200):
            served = httpx.post(
                f"{server.url}/v1/completions",
                json={"model": "demo-tiny", "prompt": "again", "max_tokens": 1},
                headers=headers,
                timeout=30,
            )
            if served.status_code != 429:
                break
        assert served is not None
        assert served.status_code == 200, served.text

    def test_the_logs_name_the_key_and_never_hold_one(self, server: Server) -> None:
        """After keyed traffic, wrong keys and an admin call with its token: the request
        lines name the key, and no key or token appears anywhere in the log."""
        httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "demo-tiny", "prompt": "logged", "max_tokens": 1},
            headers={"X-Api-Key": BOB},
            timeout=30,
        )
        httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "demo-tiny", "prompt": "x"},
            headers={"Authorization": f"Bearer {ALICE}x"},
            timeout=30,
        )
        httpx.get(
            f"{server.admin_url}/admin/models",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )
        text = server.stdout.read_text() + server.stderr.read_text()
        for secret in (ALICE, BOB, ADMIN_TOKEN, ALICE[3:], BOB[3:]):
            assert secret not in text
        requests = [
            line
            for line in server.log_lines()
            if line["event"] == "request" and line.get("path") == "/v1/completions"
        ]
        assert {"bob"} <= {line.get("key") for line in requests}


class TestAdminListener:
    def test_needs_the_token(self, server: Server) -> None:
        """With server.admin_token set, every admin request needs it."""
        url = f"{server.admin_url}/admin/models"
        assert httpx.get(url, timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.get(url, headers=wrong, timeout=10).status_code == 401
        right = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert httpx.get(url, headers=right, timeout=10).status_code == 200

    @pytest.mark.parametrize(
        ("flags", "message"),
        [
            (["--admin-bind", "0.0.0.0:0"], "set server.admin_token"),
            (["--admin-bind", "127.0.0.1:8123", "--port", "8123"], "is the public port"),
            (["--admin-bind", "nonsense"], "expected host:port or unix:/path"),
        ],
    )
    def test_start_up_refuses_an_unsafe_admin_bind(
        self, server_env: dict[str, str], flags: list[str], message: str
    ) -> None:
        """One clear line and exit status 2, before anything loads."""
        done = subprocess.run(
            [sys.executable, "-m", "ensemble_ops", "serve", "--demo", *flags],
            capture_output=True,
            text=True,
            timeout=60,
            env=server_env,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
