"""Real processes for the scale-out tests: Redis, ``ensemble-ops serve`` replicas and HAProxy.

Every part runs as its own process on a loopback port of its own (never Redis's 6379: a
Debian install may run a system Redis there) and restarts in place, on the same port, the
way a Kubernetes pod comes back behind the same Service.
"""

from __future__ import annotations

import csv
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import httpx

from ..conftest import free_port
from ..processes import Server, required_binary, start_serve, wait_loaded, wait_until
from ..redis_server import RedisServer

__all__ = ["Fleet", "HAProxy", "Replica", "fleet_config", "wait_until"]

DRAIN_DELAY_S = 2.0
"""The replicas' ``server.drain_delay_s``: several HAProxy check intervals."""
CHECK_INTERVAL_S = 0.25


class Replica:
    """One ``ensemble-ops serve`` process on a fixed port; each start logs to new files."""

    def __init__(self, name: str, directory: Path, env: dict[str, str], args: Sequence[str]):
        self.name = name
        self.port = free_port()
        self._directory = directory
        self._env = env
        self._args = tuple(args)
        self._server: Server | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def server(self) -> Server:
        assert self._server is not None, f"{self.name} was never started"
        return self._server

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.process.poll() is None

    def start(self) -> None:
        """Start on this replica's port and return at once."""
        assert not self.running, f"{self.name} is already running"
        self._starts += 1
        stem = f"{self.name}.{self._starts}"
        self._server = start_serve(
            self._directory / f"{stem}.stdout.log",
            self._directory / f"{stem}.stderr.log",
            self._env,
            self.port,
            *self._args,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until every member loaded and readiness answers 200."""
        wait_loaded(self.server, timeout_s)

        def ready() -> bool:
            return httpx.get(f"{self.url}/health/ready", timeout=5).status_code == 200

        wait_until(ready, 10, f"{self.name} to be ready")

    def sigterm(self) -> subprocess.Popen[bytes]:
        """SIGTERM, as Kubernetes stops a pod; the process, to watch it go."""
        process = self.server.process
        process.send_signal(signal.SIGTERM)
        return process

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; the exit status."""
        return self.sigterm().wait(timeout=timeout_s)


def fleet_config(demo_dir: Path, keys: Sequence[str] = ()) -> str:
    """Two small demo members sized so that three replicas share two cores; ``keys``: TOML
    ``[[auth.keys]]`` blocks."""
    members = "".join(
        f"""
[[models]]
name = "{name}"
path = "{demo_dir / f"{name}.gguf"}"
n_ctx = 512
n_threads = 1
parallel = 2
queue_size = 32
"""
        for name in ("demo-tiny", "demo-small")
    )
    return f"""
[server]
shutdown_timeout_s = 20.0

[reload]
warmup_iterations = 1
{members}{"".join(keys)}"""


class HAProxy:
    """A real HAProxy in front of the replicas, configured as a Kubernetes Service behaves:
    round robin over the replicas that pass readiness, and never a retry or a redispatch, so
    a request sent to a replica that cannot take it is lost, not hidden.

    ``mode``: ``http`` (a TLS-terminating proxy would be: it adds X-Forwarded-For) or
    ``tcp`` (bytes passed through). Either way it connects to the replicas from loopback."""

    def __init__(
        self, directory: Path, replicas: Sequence[Replica], *, mode: str = "http", name: str = ""
    ) -> None:
        self._binary = required_binary("haproxy", "haproxy")
        self._directory = directory
        stem = f"haproxy{name}"
        self._socket = directory / f"{stem}.sock"
        self.port = free_port()
        self._mode = mode
        self._config = directory / f"{stem}.cfg"
        self._config.write_text(self._render(replicas))
        self.log = directory / f"{stem}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _render(self, replicas: Sequence[Replica]) -> str:
        servers = "".join(f"    server {r.name} 127.0.0.1:{r.port} check\n" for r in replicas)
        interval = f"{int(CHECK_INTERVAL_S * 1000)}ms"
        http = self._mode == "http"
        http_defaults = (
            "    option httplog\n    option forwardfor\n    timeout http-request 10s\n"
            "    timeout http-keep-alive 30s\n"
            if http
            else "    option tcplog\n"
        )
        served_by = "    http-response set-header X-Served-By %[srv_name]\n" if http else ""
        return f"""\
global
    nbthread 1
    maxconn 256
    log stdout format raw local0 info
    stats socket {self._socket} mode 600 level admin

defaults
    mode {self._mode}
    log global
{http_defaults}    # Like a Kubernetes Service: no retry, a cut connection is a lost request.
    retries 0
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout queue 30s
    timeout check 1s

frontend fleet
    bind 127.0.0.1:{self.port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk
    http-check send meth GET uri /health/ready ver HTTP/1.1 hdr Host fleet
    http-check expect status 200
    default-server inter {interval} fall 1 rise 2
{served_by}{servers}"""

    def start(self) -> None:
        check = subprocess.run(
            [self._binary, "-c", "-q", "-f", str(self._config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        with self.log.open("wb") as out:
            self._process = subprocess.Popen(
                [self._binary, "-db", "-f", str(self._config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        process = self._process

        def listening() -> bool:
            assert process.poll() is None, self.log.read_text()
            return self._socket.exists()

        wait_until(listening, 10, "haproxy's stats socket")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def _command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self._socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_status(self, name: str) -> str:
        """The backend server's check status as HAProxy sees it: UP, DOWN, "UP 1/2", ..."""
        text = self._command("show stat").removeprefix("# ")
        for row in csv.DictReader(text.splitlines()):
            if row["pxname"] == "replicas" and row["svname"] == name:
                return row["status"]
        raise AssertionError(f"haproxy has no server {name}: {text}")

    def wait_status(self, name: str, status: str, timeout_s: float = 15.0) -> None:
        wait_until(
            lambda: self.server_status(name) == status,
            timeout_s,
            f"haproxy to see {name} {status}",
            interval_s=0.05,
        )


class Fleet:
    """Redis, the replicas and HAProxy, started together and put back together after a test."""

    def __init__(self, redis: RedisServer, replicas: Sequence[Replica], haproxy: HAProxy):
        self.redis = redis
        self.replicas = tuple(replicas)
        self.haproxy = haproxy

    @property
    def url(self) -> str:
        return self.haproxy.url

    def start(self) -> None:
        self.redis.start()  # returns once it answers PING
        for replica in self.replicas:
            replica.start()
        self.haproxy.start()
        self.ensure_up()

    def ensure_up(self) -> None:
        """Restart whatever a test left stopped; return when HAProxy sees every replica UP."""
        if not self.redis.answers():
            self.redis.start()
        for replica in self.replicas:
            if not replica.running:
                replica.start()
        for replica in self.replicas:
            replica.wait_ready()
            self.haproxy.wait_status(replica.name, "UP")

    def stop(self) -> dict[str, int]:
        """Stop everything; the replicas' exit statuses by name."""
        self.haproxy.stop()
        running = {r.name: r.sigterm() for r in self.replicas if r.running}
        codes = {name: process.wait(timeout=60) for name, process in running.items()}
        self.redis.kill()
        return codes
