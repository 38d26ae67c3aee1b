"""What every benchmark shares: processes to measure, load to offer, and the statistics.

- ``Server.start``: ``ensemble-ops serve``, with no config (the real-model default ensemble)
  or a config written from ``{member: GGUF path}``; the peers ``llama_cpp_server`` (Python)
  and ``llama_server`` (C++, ``llama_server_binary``); ``redis_server``. Each is a context
  manager that waits until the process is ready, prints its logs' last lines when it never
  is, and stops it with SIGTERM, then SIGKILL after a timeout.
- Load: ``closed_loop`` (N clients drawing request bodies from one iterator), ``direct_run``
  (the same bodies through an in-process ``llama_cpp.Llama``: the baseline with no server),
  ``ProbeSampler`` (GETs in a thread of their own, so a busy event loop cannot delay them),
  ``reload_member`` and ``PeakSampler``.
- Statistics: one nearest-rank ``percentile``, ``spread``, ``median``, ``ratio``.

Imports only the package's own dependencies and httpx: ``benchmarks/gpu_check.sh`` installs
nothing else on the GPU machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import httpx
import psutil

T = TypeVar("T")

RESULTS_DIR = Path(__file__).parent / "results"
N_CTX = 2048
START_TIMEOUT_S = 300.0  # the real models load in tens of seconds on two busy cores
STOP_TIMEOUT_S = 60.0
TAIL_LINES = 30
KEPT_HEADERS = ("x-cache", "x-ensemble-member", "server-timing")
PROMPTS = [f"Request number {i} asks the ensemble about the weather" for i in range(64)]
BUILD_SCRIPT = Path(__file__).parent / "build_llama_server.sh"


# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least q% of values at or below.

    Never interpolated nor rounded down, so a small sample cannot flatter a pass/fail: the
    95th of 13 values is the 13th.
    """
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def spread(values: Sequence[float], *, prefix: str = "", peak: bool = False) -> dict[str, float]:
    """``{prefix}p50_ms`` and ``{prefix}p99_ms`` of ``values`` (ms), ``{prefix}max_ms`` too
    with ``peak``: the figures most results files report."""
    figures = {f"{prefix}p{q}_ms": percentile(values, q) for q in (50, 99)}
    if peak:
        figures[f"{prefix}max_ms"] = max(values)
    return figures


def median(values: Sequence[float]) -> float:
    """The median (of an even count: the mean of the middle two)."""
    return statistics.median(values)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unknown or b is not positive."""
    return a / b if a is not None and b is not None and b > 0 else None


def server_ms(headers: Mapping[str, str]) -> float | None:
    """The app's own time from ``Server-Timing: app;dur=<ms>``, if the headers hold it."""
    for metric in headers.get("server-timing", "").split(","):
        name, _, params = metric.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if name == "app" and key == "dur":
                return float(value)
    return None


# -- results ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The machine a result comes from."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def utc_now() -> str:
    """Now, for a result's ``when``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def save(path: Path, result: Mapping[str, Any]) -> None:
    """Write ``result`` as indented JSON (what ``benchmarks/report.py`` reads) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {path}")


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without ``ENSEMBLE_OPS_*`` (the caller's settings must not leak into
    a measurement), a server that stops at once on SIGTERM (no drain delay), then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENSEMBLE_OPS_")}
    return env | {"ENSEMBLE_OPS_SERVER__DRAIN_DELAY_S": "0"} | dict(extra or {})


def print_tails(paths: Iterable[Path], lines: int = TAIL_LINES) -> None:
    """The last ``lines`` lines of each file that exists: why a process did not come up."""
    for path in paths:
        if path.is_file():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- last lines of {path.name}:", *tail, sep="\n")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout_s``; the exit status."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def wait_for(
    probe: Callable[[], T | None],
    *,
    process: subprocess.Popen[bytes] | None = None,
    timeout_s: float = START_TIMEOUT_S,
    what: str = "server",
) -> T:
    """Poll ``probe`` until it returns something; fail early when ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            found = probe()
        except httpx.TransportError:
            found = None
        if found is not None:
            return found
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s")


@dataclass
class Service:
    """A started process and the URL it serves on."""

    process: subprocess.Popen[bytes]
    url: str

    @property
    def pid(self) -> int:
        """The process ID."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once stopped."""
        return self.process.returncode

    @functools.cached_property
    def _ps(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def rss_bytes(self) -> int:
        """The process's resident memory now."""
        rss: int = self._ps.memory_info().rss
        return rss


def _exit(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM to the benchmark (``timeout``, a CI cancel) raises SystemExit for the block,
    so the processes it started are stopped on the way out, not left serving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _launched(
    command: Sequence[str],
    ready: Callable[[], T | None],
    *,
    what: str,
    log: Path | None = None,
    tails: Sequence[Path] = (),
    env: Mapping[str, str] | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[tuple[subprocess.Popen[bytes], T]]:
    """``command`` with stderr to ``log``, once ``ready`` answers; stopped on exit.

    When it does not come up it is killed and ``tails`` (``log`` among them) are printed.
    """
    with _sigterm_exits():
        with contextlib.ExitStack() as files:
            stderr: int | IO[bytes] = (
                subprocess.DEVNULL if log is None else files.enter_context(log.open("wb"))
            )
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        try:
            found = wait_for(ready, process=process, timeout_s=timeout_s, what=what)
        except BaseException:
            process.kill()
            process.wait()
            print_tails([*tails, *([log] if log else [])])
            raise
        try:
            yield process, found
        finally:
            stop_process(process)


def _answers_200(url: str) -> bool | None:
    """True once GET ``url`` answers 200 (how the peers say they are up)."""
    return True if httpx.get(url, timeout=2).status_code == 200 else None


# -- ensemble-ops -------------------------------------------------------------------------


def ready_members(url: str) -> list[str] | None:
    """The members once /health/ready is 200 and each member's ``meta.state`` is ready."""
    if httpx.get(f"{url}/health/ready", timeout=2).status_code != 200:
        return None
    answer = httpx.get(f"{url}/v1/models", timeout=2)
    if answer.status_code != 200:
        return None
    # Routing entries (ensemble, splits) come first and have no state.
    members = [card for card in answer.json()["data"] if "state" in card["meta"]]
    if members and all(card["meta"]["state"] == "ready" for card in members):
        return [card["id"] for card in members]
    return None


def wait_ready(url: str, timeout_s: float = START_TIMEOUT_S) -> list[str]:
    """Poll a server that runs elsewhere until it is ready (``ready_members``); its members."""
    return wait_for(lambda: ready_members(url), timeout_s=timeout_s)


def write_config(
    path: Path,
    models: Mapping[str, Path],
    *,
    threads: int | None = None,
    n_ctx: int = N_CTX,
    model_fields: Mapping[str, Any] | None = None,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """A TOML config: ``sections`` as tables, then one ``[[models]]`` per member with
    ``n_ctx``, ``n_threads`` (when given) and ``model_fields``."""
    lines: list[str] = []
    for table, values in (sections or {}).items():
        lines += [f"[{table}]", *(f"{key} = {_toml(value)}" for key, value in values.items())]
    for name, model in models.items():
        fields = {"name": name, "path": str(model), "n_ctx": n_ctx}
        fields |= {"n_threads": threads} if threads else {}
        fields |= dict(model_fields or {})
        lines += ["[[models]]", *(f"{key} = {_toml(value)}" for key, value in fields.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    """A TOML value: JSON's scalars and arrays are TOML too; tables are written inline."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(value)


@dataclass
class Server(Service):
    """A running ``ensemble-ops serve``: its URL, process, members, work dir and the URL of
    its admin listener (reloads)."""

    members: list[str]
    workdir: Path
    admin_url: str

    @property
    def log(self) -> Path:
        """The server's JSON log (the production default: info, one line per request)."""
        return self.workdir / "server.log"

    @classmethod
    @contextlib.contextmanager
    def start(
        cls,
        workdir: Path,
        models: Mapping[str, Path] | None = None,
        *,
        threads: int | None = None,
        n_ctx: int = N_CTX,
        model_fields: Mapping[str, Any] | None = None,
        sections: Mapping[str, Mapping[str, Any]] | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float = START_TIMEOUT_S,
        admin: bool = True,
    ) -> Iterator[Server]:
        """``ensemble-ops serve`` once ready (``ready_members``), stopped on exit.

        No ``models``: no config, so the default real-model ensemble. Otherwise a config in
        ``workdir`` (``write_config``); ``sections`` adds tables, e.g. ``{"cache":
        {"backend": "redis", "url": ...}}``. Logs go to ``workdir/server.log`` and stderr to
        ``workdir/server.stderr``. ``env`` is added to ``server_env()``. ``admin``: give
        the admin listener a free port of its own (a checkout from before the listener
        existed takes no ``--admin-bind``: ``admin=False``, and ``admin_url`` is empty).
        """
        port, admin_bind = free_port(), f"127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "ensemble_ops", "serve", "--port", str(port)]
        command += ["--admin-bind", admin_bind] if admin else []
        command += ["--log-file", str(workdir / "server.log")]
        if models is not None:
            config = workdir / "bench.toml"
            write_config(
                config,
                models,
                threads=threads,
                n_ctx=n_ctx,
                model_fields=model_fields,
                sections=sections,
            )
            command += ["--config", str(config)]
        url = f"http://127.0.0.1:{port}"
        with _launched(
            command,
            # The admin listener needs no API key, whatever keys the config holds.
            lambda: ready_members(f"http://{admin_bind}" if admin else url),
            what="ensemble-ops serve",
            log=workdir / "server.stderr",
            tails=[workdir / "server.log"],
            env=server_env(env),
            timeout_s=timeout_s,
        ) as (process, members):
            yield cls(process, url, members, workdir, f"http://{admin_bind}" if admin else "")

    def error_lines(self) -> list[str]:
        """The log's lines at level error or critical."""
        found = []
        if self.log.is_file():
            for line in self.log.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
                    found.append(line)
        return found


# -- peers --------------------------------------------------------------------------------


@contextlib.contextmanager
def llama_cpp_server(
    model: Path,
    *,
    threads: int | None = None,
    n_ctx: int = N_CTX,
    workdir: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[Service | None]:
    """``python -m llama_cpp.server`` on ``model`` once up; None when it is not installed.

    Its stderr goes to ``workdir/llama_cpp_server.stderr`` when ``workdir`` is given.
    """
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        yield None
        return
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model)]
    command += ["--n_ctx", str(n_ctx), "--port", str(port), "--verbose", "false"]
    if threads:
        command += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    url = f"http://127.0.0.1:{port}"
    log = None if workdir is None else workdir / "llama_cpp_server.stderr"
    with _launched(
        command,
        lambda: _answers_200(f"{url}/v1/models"),
        what="llama_cpp.server",
        log=log,
        timeout_s=timeout_s,
    ) as (process, _):
        yield Service(process, url)


def llama_server_binary() -> Path | None:
    """The C++ ``llama-server`` that ``build_llama_server.sh`` cached, None when not built."""
    import llama_cpp

    # Where the script puts it: one binary per llama-cpp-python version.
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    binary = cache / "ensemble-ops" / "bench" / f"llama-server-{llama_cpp.__version__}"
    return binary if os.access(binary, os.X_OK) else None


def build_llama_server() -> Path:
    """The C++ ``llama-server``, built by ``build_llama_server.sh`` when not cached yet
    (minutes on two cores)."""
    cached = llama_server_binary()
    if cached is not None:
        return cached
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"PYTHON": sys.executable},
    )
    return Path(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def llama_server(
    binary: Path,
    model: Path,
    *,
    slots: int = 1,
    threads: int | None = None,
    n_ctx: int = N_CTX,
    workdir: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[Service]:
    """The C++ server on ``model`` with ``slots`` slots of ``n_ctx`` tokens each, once up."""
    port = free_port()
    command = [str(binary), "-m", str(model), "-np", str(slots), "-c", str(n_ctx * slots)]
    command += ["--port", str(port), "--log-disable"]
    if threads:
        command += ["-t", str(threads), "-tb", str(threads)]
    url = f"http://127.0.0.1:{port}"
    log = None if workdir is None else workdir / "llama_server.stderr"
    with _launched(
        command,
        lambda: _answers_200(f"{url}/v1/models"),
        what="llama-server",
        log=log,
        timeout_s=timeout_s,
    ) as (process, _):
        yield Service(process, url)


@dataclass
class Redis(Service):
    """A running ``redis-server``; ``url`` is its ``redis://`` URL."""

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP for the block, then SIGCONT: a Redis that stops answering."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[Redis]:
    """``redis-server`` on a free port without persistence, once it accepts connections.

    Exits the benchmark when Debian's ``redis-server`` is not installed.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()

    def accepts() -> bool | None:
        with socket.socket() as sock:
            return True if sock.connect_ex(("127.0.0.1", port)) == 0 else None

    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    with _launched(
        [*command, "--dir", str(workdir)],
        accepts,
        what="redis-server",
        log=workdir / "redis.stderr",
        timeout_s=10,
    ) as (process, _):
        yield Redis(process, f"redis://127.0.0.1:{port}/0")


# -- load ---------------------------------------------------------------------------------


def until(stop: asyncio.Event | threading.Event, items: Iterable[T]) -> Iterator[T]:
    """``items`` until ``stop`` is set: a closed loop that runs until told to stop."""
    return itertools.takewhile(lambda _: not stop.is_set(), items)


def completion_bodies(
    model: str | None, max_tokens: int, count: int | None = None, temperature: float = 0.8
) -> Iterator[dict[str, Any]]:
    """``count`` (None: endless) ``/v1/completions`` bodies cycling through ``PROMPTS``;
    sampled, so the response cache never answers them. No ``model``: the default route."""
    for i in itertools.count() if count is None else range(count):
        body: dict[str, Any] = {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        yield body if model is None else {"model": model} | body


@dataclass(frozen=True)
class Record:
    """One request: when it was sent (``perf_counter``), how long it took, what came back.

    ``status`` None: no answer (a transport error or the deadline). ``error`` None: a 200
    with a usable body. ``ttft_s``: time to the first streamed event (streams only).
    """

    started: float
    latency_s: float
    status: int | None
    error: str | None = None
    ttft_s: float | None = None
    completion_tokens: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def ended(self) -> float:
        return self.started + self.latency_s

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class LoadRun:
    """The records of one run and its wall time, from the first send to the last answer."""

    records: list[Record]
    seconds: float

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.records)

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens or 0 for r in self.records)

    @property
    def requests_per_s(self) -> float:
        return len(self.records) / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _tokens(usage: Any) -> int | None:
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return int(usage["completion_tokens"])
    return None


async def _read_stream(response: httpx.Response, sent: float) -> tuple[float | None, int | None]:
    """Time to the first event and the completion tokens of a usage event, if one comes."""
    ttft, tokens = None, None
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        ttft = time.perf_counter() - sent if ttft is None else ttft
        with contextlib.suppress(ValueError, AttributeError):  # [DONE], or not an object
            tokens = _tokens(json.loads(line.removeprefix("data: ")).get("usage")) or tokens
    return ttft, tokens


async def send(
    client: httpx.AsyncClient,
    url: str,
    body: Mapping[str, Any],
    *,
    timeout_s: float | None = None,
    keep: Sequence[str] = KEPT_HEADERS,
) -> Record:
    """POST ``body`` to ``url`` (streamed when it asks to be) with a deadline on the whole
    request (httpx's timeout is per operation), as a ``Record`` with the ``keep`` headers."""
    sent = time.perf_counter()

    def failed(error: str, status: int | None = None) -> Record:
        return Record(sent, time.perf_counter() - sent, status, error)

    ttft, tokens = None, None
    try:
        async with (
            asyncio.timeout(timeout_s),
            client.stream("POST", url, json=dict(body)) as response,
        ):
            if response.status_code == 200 and body.get("stream"):
                ttft, tokens = await _read_stream(response, sent)
            else:
                await response.aread()
    except (TimeoutError, httpx.TimeoutException):
        return failed("timeout")
    except httpx.TransportError as err:
        return failed(type(err).__name__)
    if response.status_code != 200:
        return failed(f"status {response.status_code}", response.status_code)
    if not body.get("stream"):
        try:
            tokens = _tokens(response.json()["usage"])
        except (ValueError, KeyError, TypeError):
            tokens = None
        if tokens is None:
            return failed("invalid body", 200)
    headers = {k: response.headers[k] for k in keep if k in response.headers}
    return Record(sent, time.perf_counter() - sent, 200, None, ttft, tokens, headers)


async def closed_loop(
    url: str,
    bodies: Iterable[Mapping[str, Any]],
    *,
    concurrency: int,
    path: str = "/v1/completions",
    warmup: Mapping[str, Any] | None = None,
    timeout_s: float = 60.0,
    keep: Sequence[str] = KEPT_HEADERS,
) -> LoadRun:
    """``concurrency`` clients, each sending its next body from the shared ``bodies`` as soon
    as its last answer came; ``warmup`` is sent first, outside the clock and the records."""
    shared = iter(bodies)
    records: list[Record] = []
    target = f"{url}{path}"

    async def client(http: httpx.AsyncClient) -> None:
        for body in shared:
            records.append(await send(http, target, body, timeout_s=timeout_s, keep=keep))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        if warmup is not None:
            await send(http, target, warmup, timeout_s=timeout_s)
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return LoadRun(records, time.perf_counter() - started)


async def completion_load(
    url: str,
    member: str,
    *,
    requests: int,
    concurrency: int,
    max_tokens: int,
    timeout_s: float = 60.0,
) -> LoadRun:
    """``requests`` sampled completions (``completion_bodies``) on ``member`` from
    ``concurrency`` clients, after one warm-up request: a throughput cell."""
    return await closed_loop(
        url,
        completion_bodies(member, max_tokens, requests),
        concurrency=concurrency,
        warmup={"model": member, "prompt": "warm", "max_tokens": max_tokens},
        timeout_s=timeout_s,
    )


@contextlib.contextmanager
def in_process(
    model: Path, *, n_ctx: int = N_CTX, threads: int | None = None, n_gpu_layers: int = 0
) -> Iterator[Any]:
    """``llama_cpp.Llama`` on ``model`` in this process, closed on exit."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(model),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=n_gpu_layers,
        verbose=False,
    )
    try:
        yield llm
    finally:
        llm.close()


def direct_run(
    llm: Any, bodies: Iterable[Mapping[str, Any]], *, warmup: Mapping[str, Any] | None = None
) -> LoadRun:
    """The bodies through llama_cpp's own API, one after another (all it can do at once):
    chat for bodies with ``messages``, text otherwise; ``model`` is ignored."""

    def call(body: Mapping[str, Any]) -> Any:
        arguments = {k: v for k, v in body.items() if k != "model"}
        if "messages" in arguments:
            return llm.create_chat_completion(**arguments)
        return llm.create_completion(**arguments)

    if warmup is not None:
        call(warmup)
    records = []
    started = time.perf_counter()
    for body in bodies:
        sent = time.perf_counter()
        tokens = _tokens(call(body)["usage"])
        records.append(Record(sent, time.perf_counter() - sent, 200, completion_tokens=tokens))
    return LoadRun(records, time.perf_counter() - started)


@dataclass(frozen=True)
class ProbeSample:
    """One GET: its status (None: no answer), the client's time and the app's own (ms)."""

    status: int | None
    client_ms: float
    server_ms: float | None


class ProbeSampler:
    """GETs each of ``paths`` once a round, a round every ``every_s``, in a thread of its own
    with its own connection (the load generator's event loop must not delay it); ``rounds``
    rounds, or until stopped.

    ``run()`` blocks (``asyncio.to_thread(sampler.run)``); as a context manager it samples
    in the background for the block.
    """

    def __init__(
        self,
        url: str,
        paths: Sequence[str],
        *,
        every_s: float,
        rounds: int | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.url = url
        self.every_s = every_s
        self.rounds = rounds
        self.timeout_s = timeout_s
        self.samples: dict[str, list[ProbeSample]] = {path: [] for path in paths}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, daemon=True)

    def _get(self, client: httpx.Client, path: str) -> ProbeSample:
        sent = time.perf_counter()
        try:
            response = client.get(path)
        except httpx.HTTPError:
            return ProbeSample(None, (time.perf_counter() - sent) * 1000, None)
        client_ms = (time.perf_counter() - sent) * 1000
        return ProbeSample(response.status_code, client_ms, server_ms(response.headers))

    def run(self) -> dict[str, list[ProbeSample]]:
        """Sample until ``rounds`` are done or ``stop()``; the samples by path."""
        started = time.perf_counter()
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            for done in itertools.count(1):
                for path, samples in self.samples.items():
                    samples.append(self._get(client, path))
                if done == self.rounds:
                    break
                # Rounds on a fixed schedule, whatever each took.
                if self._stop.wait(max(0.0, started + done * self.every_s - time.perf_counter())):
                    break
        return self.samples

    def stop(self) -> None:
        self._stop.set()

    def __enter__(self) -> ProbeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._thread.join()


class PeakSampler:
    """The peak of ``read()`` (RSS, device memory; None: no reading) sampled every
    ``interval_s`` in a thread, for the block of a ``with``."""

    def __init__(self, read: Callable[[], float | None], interval_s: float) -> None:
        self.peak: float | None = None
        self._read = read
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.peak = value if self.peak is None else max(self.peak, value)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class Reloaded:
    """How one reload went: ``outcome`` is completed, failed, refused (not 202), no answer
    or timed out; ``status`` the POST's; ``started`` a ``perf_counter``."""

    member: str
    outcome: str
    status: int | None
    started: float
    seconds: float
    error: str | None = None
    final: dict[str, Any] | None = None
    """The reload's last status (``GET /health/llm/reload/{member}``), once it ended."""

    @property
    def ended(self) -> float:
        return self.started + self.seconds


async def reload_member(
    client: httpx.AsyncClient,
    admin_url: str,
    member: str,
    *,
    poll_s: float = 0.1,
    timeout_s: float = 300.0,
    body: Mapping[str, Any] | None = None,
) -> Reloaded:
    """``POST /admin/models/{member}/reload`` (with ``body``) on the admin listener, then its
    status until it completes, fails or rolls back."""
    started = time.perf_counter()
    status = None

    def ended(
        outcome: str, error: str | None = None, final: dict[str, Any] | None = None
    ) -> Reloaded:
        seconds = time.perf_counter() - started
        return Reloaded(member, outcome, status, started, seconds, error, final)

    try:
        answer = await client.post(
            f"{admin_url}/admin/models/{member}/reload", json=dict(body or {})
        )
        status = answer.status_code
        if status != 202:
            return ended("refused", f"{status} {answer.text[:500]}")
        while time.perf_counter() - started < timeout_s:
            state = (await client.get(f"{admin_url}/health/llm/reload/{member}")).json()
            if state["state"] in ("completed", "failed", "rolled_back"):
                return ended(str(state["state"]), state.get("error"), state)
            await asyncio.sleep(poll_s)
    except httpx.HTTPError as err:
        return ended("no answer", repr(err))
    return ended("timed out", f"not done after {timeout_s:.0f} s")
