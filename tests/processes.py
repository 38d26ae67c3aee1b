"""Real processes for end-to-end tests: ``ensemble-ops serve`` and a real Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import free_port


def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    """The public listener."""
    stdout: Path
    stderr: Path
    admin_url: str
    """The admin listener."""

    def log_lines(self) -> list[dict[str, Any]]:
        """Every stdout line, parsed: a line that is not JSON fails the test."""
        return [json.loads(line) for line in self.stdout.read_text().splitlines()]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def start_serve(stdout: Path, stderr: Path, env: dict[str, str], port: int, *args: str) -> Server:
    """Start ``ensemble-ops serve`` on ``port``, its admin listener on a free port of its own
    (``args`` may name another ``--admin-bind``), and return at once (no waiting)."""
    given = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--admin-bind"]
    admin = given[-1] if given else f"127.0.0.1:{free_port()}"
    command = ["serve", "--port", str(port), "--admin-bind", admin, *args]
    with stdout.open("wb") as out, stderr.open("wb") as err:  # the child keeps its copies
        process = subprocess.Popen(
            [sys.executable, "-m", "ensemble_ops", *command], stdout=out, stderr=err, env=env
        )
    admin_url = admin if admin.startswith("unix:") else f"http://{admin}"
    return Server(process, f"http://127.0.0.1:{port}", stdout, stderr, admin_url)


def admin_get(server: Server, path: str) -> httpx.Response:
    """GET ``path`` from the admin listener, over TCP or its Unix socket."""
    if server.admin_url.startswith("unix:"):
        socket_path = server.admin_url.removeprefix("unix:")
        if not Path(socket_path).is_socket():  # httpcore leaks the socket of a failed connect
            raise httpx.ConnectError(f"no socket at {socket_path} yet")
        transport = httpx.HTTPTransport(uds=socket_path)
        with httpx.Client(transport=transport, base_url="http://admin", timeout=1) as client:
            return client.get(path)
    return httpx.get(f"{server.admin_url}{path}", timeout=1)


def wait_loaded(server: Server, timeout_s: float = 120.0) -> None:
    """Wait until every member of ``server`` has loaded (or failed); stop it on a timeout.
    Asks the admin listener, which needs no API key."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(
                f"server exited: {server.stderr.read_text()}{server.stdout.read_text()}"
            )
        try:
            models = admin_get(server, "/v1/models").json()["data"][1:]
            if all(m["meta"]["state"] in ("ready", "failed") for m in models):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError("server did not become ready")


def launch(tmp_path: Path, env: dict[str, str], *args: str) -> Server:
    """Start the CLI as a new user would; wait until every member has loaded (or failed)."""
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    server = start_serve(stdout, stderr, env, free_port(), *args)
    wait_loaded(server)
    return server


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector; raises on a PromQL error."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = answer.json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        """The single value of ``expr`` (0 samples or several fail the test)."""
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])


def required_binary(name: str, package: str) -> str:
    """The path of ``name``; skips the test when absent, except in CI where it fails.

    Debian puts daemons such as haproxy in /usr/sbin, which a user's PATH may lack.
    """
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (CI installs Debian's {package} package)")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return found


def prometheus_binary() -> str:
    """The prometheus binary; skips the test when absent, except in CI where it fails."""
    return required_binary("prometheus", "prometheus")


@contextmanager
def prometheus(
    tmp_path: Path,
    targets: str | Mapping[str, Mapping[str, str]],
    metrics_path: str = "/health/metrics",
    *,
    job: str = "ensemble-ops",
) -> Iterator[Prometheus]:
    """A real Prometheus on loopback scraping every second into a temp dir: one ``host:port``
    target, or several, each with the labels it gets (as a ServiceMonitor would label pods)."""
    binary = prometheus_binary()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    labelled = {targets: {}} if isinstance(targets, str) else targets
    scrape = {
        "job_name": job,
        "metrics_path": metrics_path,
        "static_configs": [
            {"targets": [host], "labels": dict(labels)} for host, labels in labelled.items()
        ],
    }
    settings = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config.write_text(yaml.safe_dump({"global": settings, "scrape_configs": [scrape]}))
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise AssertionError((tmp_path / "prometheus.log").read_text())
            time.sleep(0.2)
        yield Prometheus(url)
    finally:
        process.terminate()
        process.wait(timeout=30)
