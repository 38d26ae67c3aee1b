"""``GET /events`` over real connections, and ``ensemble-ops events`` following it.

A real server process (the demo ensemble): records filtered and resumed, the heartbeat,
open streams that end at SIGTERM instead of holding the shutdown, and the CLI printing a
reload's states in order. The slow client is made in-process: a consumer that never reads.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest

from ensemble_ops.config import Settings
from ensemble_ops.events import ReloadStateChanged
from ensemble_ops.http.app import create_app
from ensemble_ops.observability.event_feed import RING_SIZE

from ..conftest import process_env, serving
from ..processes import Server, launch

STATES = [
    ("idle", "warming_up"),
    ("warming_up", "ready"),
    ("ready", "switching"),
    ("switching", "completed"),
]


@pytest.fixture(name="server", scope="module")
def _server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = process_env() | {
        "ENSEMBLE_OPS_SERVER__EVENTS_HEARTBEAT_S": "0.2",
        "ENSEMBLE_OPS_SERVER__SHUTDOWN_TIMEOUT_S": "120",  # a held stream would show
    }
    server = launch(tmp_path_factory.mktemp("events"), env, "--demo")
    yield server
    server.stop()


class _Stream:
    """An open ``/events`` stream read in a thread: its frames, and whether it ended."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.frames: list[dict[str, Any]] = []
        self.comments = 0
        self.media_type = ""
        self.opened = threading.Event()
        self.ended = threading.Event()
        self._url, self._headers = url, headers or {}
        threading.Thread(target=self._read, daemon=True).start()
        assert self.opened.wait(30)

    def _read(self) -> None:
        try:
            with httpx.stream("GET", self._url, headers=self._headers, timeout=60) as answer:
                self.media_type = answer.headers.get("content-type", "")
                self.opened.set()
                for line in answer.iter_lines():
                    if line.startswith("data: "):
                        self.frames.append(json.loads(line[6:]))
                    elif line.startswith(":"):
                        self.comments += 1
        except httpx.HTTPError:
            pass
        finally:
            self.opened.set()
            self.ended.set()

    def wait_for_heartbeat(self) -> None:
        for _ in range(300):
            if self.comments:
                return
            self.ended.wait(0.1)
        raise AssertionError("no heartbeat")

    def wait_for(self, count: int) -> list[dict[str, Any]]:
        for _ in range(300):
            if len(self.frames) >= count:
                return self.frames
            self.ended.wait(0.1)
        raise AssertionError(f"{len(self.frames)} of {count} frames: {self.frames}")


def _reload(server: Server, member: str = "demo-tiny") -> None:
    assert (
        httpx.post(f"{server.admin_url}/admin/models/{member}/reload", timeout=30).status_code
        == 202
    )


class TestStream:
    def test_a_reloads_states_in_order_filtered_then_resumed(self, server: Server) -> None:
        query = "?model=demo-tiny&type=reload.state_changed"
        stream = _Stream(f"{server.url}/events{query}")
        _reload(server)
        frames = stream.wait_for(4)
        assert [f["to"] for f in frames[-4:]] == [to for _, to in STATES]
        assert {f["model"] for f in frames} == {"demo-tiny"}
        stream.wait_for_heartbeat()  # a comment after 0.2 s without events, here
        assert stream.media_type.startswith("text/event-stream")
        # A client that lost the connection after the second resumes with the third.
        resumed = _Stream(
            f"{server.url}/events{query}", headers={"Last-Event-ID": str(frames[-3]["id"])}
        )
        assert [f["to"] for f in resumed.wait_for(2)[:2]] == ["switching", "completed"]

    def test_requests_are_summaries_without_their_text(self, server: Server) -> None:
        stream = _Stream(f"{server.url}/events?type=request")
        body = {"model": "demo-small", "prompt": "a secret prompt", "max_tokens": 2}
        answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        [frame] = stream.wait_for(1)
        assert (frame["model"], frame["status"], frame["completion_tokens"]) == (
            "demo-small",
            "success",
            answer.json()["usage"]["completion_tokens"],
        )
        assert "secret" not in json.dumps(frame)
        assert (
            answer.json()["choices"][0]["text"] not in json.dumps(frame)
            or not answer.json()["choices"][0]["text"].strip()
        )


class TestShutdown:
    def test_sigterm_ends_open_streams_at_once(self, tmp_path: Path) -> None:
        """The shutdown may wait 120 s for in-flight requests: two open streams end at
        SIGTERM instead, and the process exits 0 well within that."""
        env = process_env() | {"ENSEMBLE_OPS_SERVER__SHUTDOWN_TIMEOUT_S": "120"}
        server = launch(tmp_path, env, "--demo")
        streams = [_Stream(f"{server.url}/events") for _ in range(2)]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        assert all(stream.ended.is_set() for stream in streams)


class TestSlowClient:
    async def test_a_client_that_never_reads_is_dropped_and_counted(
        self, settings: Settings
    ) -> None:
        app = create_app(settings)
        async with serving(app) as client:
            blocked = anyio.Event()

            async def never_reads(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.body" and message.get("body"):
                    blocked.set()
                    await anyio.sleep_forever()  # a consumer that stopped reading

            async def receive() -> dict[str, Any]:
                await anyio.sleep_forever()
                return {}

            scope = {
                "type": "http",
                "method": "GET",
                "path": "/events",
                "raw_path": b"/events",
                "query_string": b"",
                "headers": [(b"host", b"test")],
                "scheme": "http",
                "server": ("test", 80),
                "client": ("127.0.0.1", 1),
                "http_version": "1.1",
                "root_path": "",
            }
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(cast("Any", app), scope, receive, never_reads)
                await blocked.wait()  # it took the first write, then stopped reading
                feed = app.state.events
                assert feed.followers == 1
                for _ in range(RING_SIZE + 1):
                    app.state.bus.publish(
                        ReloadStateChanged("demo-tiny", "idle", "ready", 0.0, "x", 0.0)
                    )
                assert feed.followers == 0
                metrics = (await client.get("/metrics")).text
                tasks.cancel_scope.cancel()
        assert "llm_event_clients_dropped_total 1" in metrics


class TestCli:
    def test_events_prints_a_reloads_states_in_order(self, server: Server) -> None:
        command = [sys.executable, "-m", "ensemble_ops", "events", "--url", server.url]
        command += ["--model", "demo-base", "--type", "reload.state_changed"]
        before = _clients(server)
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as follower:
            try:
                stream = _Stream(f"{server.url}/events?type=reload.state_changed&model=demo-base")
                _wait_connected(server, before + 2)  # the CLI's stream and the test's own
                _reload(server, "demo-base")
                stream.wait_for(4)
                assert follower.stdout is not None
                lines = [follower.stdout.readline() for _ in range(4)]
                follower.send_signal(signal.SIGINT)
                assert follower.wait(timeout=30) == 0
            finally:
                follower.kill()  # a failed assertion never leaves it running
        assert [line.split()[3:6] for line in lines] == [[a, "->", b] for a, b in STATES]
        assert all(line.split()[1:3] == ["reload.state_changed", "demo-base"] for line in lines)


def _clients(server: Server) -> int:
    """Open ``/events`` streams now (llm_event_clients, read at scrape time)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return int(
        float(
            next(
                line for line in text.splitlines() if line.startswith("llm_event_clients ")
            ).split()[1]
        )
    )


def _wait_connected(server: Server, clients: int) -> None:
    """Until at least ``clients`` streams are open."""
    for _ in range(300):
        if _clients(server) >= clients:
            return
        threading.Event().wait(0.1)
    raise AssertionError("the streams did not connect")
