"""Shared fixtures: real generated GGUF models, settings, and the app run in-process."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette

from ensemble_ops.config import ModeName, Settings
from ensemble_ops.events import EventBus
from ensemble_ops.http.app import create_app
from ensemble_ops.serving.builtin import demo_settings
from ensemble_ops.serving.demo import DemoModel, ensure_demo_models, write_model
from ensemble_ops.serving.engine import (
    ChatMessage,
    ChatPrompt,
    Completion,
    Engine,
    EngineFailure,
    EngineInfo,
    GenerationParams,
    OnText,
    SequenceHandle,
    SequenceSink,
    complete,
)
from ensemble_ops.serving.ensemble import Ensemble, InferenceRequest
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.serving.real_models import ensure_real_models


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under mutmut (``nox -s mutate``) only: the tests of the mutant's own package first
    (they test it most directly), then the rest, the fastest first in each. mutmut stops a
    mutant's run at its first failing test, so a mutant that a quick test detects then costs
    seconds, not the slow rollout tests' minutes. The durations are mutmut's, from its stats
    run."""
    stats = Path("mutmut-stats.json")  # in the folder mutmut runs the tests from
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if not mutant or not stats.is_file():
        return
    durations: dict[str, float] = json.loads(stats.read_text()).get("duration_by_test", {})
    # "ensemble_ops.serving.copies.xǁCopiesǁchoose__mutmut_6": its tests are in tests/serving/
    package = mutant.split(".")[1] if mutant.count(".") > 1 else ""
    own = f"tests/{package}/"
    items.sort(
        key=lambda item: (
            not item.nodeid.startswith(own),
            durations.get(item.nodeid, math.inf),
        )
    )


BYTE_SAMPLER = DemoModel(
    "byte-sampler", n_embd=64, n_layer=2, n_ff=192, n_head=4, seed=11, printable=False
)
"""Plain random weights: samples byte tokens, i.e. text that is not valid UTF-8."""
NO_BYTE_TOKENS = DemoModel(
    "no-byte-tokens", n_embd=64, n_layer=2, n_ff=192, n_head=4, seed=12, byte_tokens=False
)
"""A vocabulary without byte tokens: llama.cpp would abort on text outside it."""


@pytest.fixture(name="demo_dir", scope="session")
def _demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    ensure_demo_models(directory)
    for model in (BYTE_SAMPLER, NO_BYTE_TOKENS):
        write_model(model, directory / model.filename)
    return directory


@pytest.fixture(name="real_paths", scope="session")
def _real_paths() -> dict[str, Path]:
    """The real models of the default ensemble, fetched once into the user's cache.

    Like ``serve``, this uses pip against the configured package index; later runs find the
    verified files in the cache and download nothing.
    """
    return ensure_real_models()


@pytest.fixture(name="settings")
def _settings(demo_dir: Path) -> Settings:
    return demo_settings(demo_dir, environ={})


SettingsFactory = Callable[..., Settings]


@pytest.fixture(name="make_settings")
def _make_settings(demo_dir: Path) -> SettingsFactory:
    """Settings over the demo models with changes: ``make_settings(cache={"enabled": False})``."""

    def make(models: list[dict[str, Any]] | None = None, **sections: Any) -> Settings:
        base = demo_settings(demo_dir, environ={}).model_dump(mode="python")
        if models is not None:
            base["models"] = models
            del base["modes"]  # the demo preferences name the demo members
        for spec in base["models"]:
            spec["path"] = str(spec["path"])
        base["server"]["admin_token"] = None
        for key, value in sections.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) else value
        return Settings.from_mapping(base, base_dir=demo_dir, environ={})

    return make


class AppClient(httpx.AsyncClient):
    """A client of an app's public listener; ``admin`` is one of its admin listener."""

    admin: httpx.AsyncClient


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[AppClient]:
    """A client of ``app`` with its lifespan entered and every model loading finished."""
    async with LifespanManager(app) as manager:
        ensemble: Ensemble = app.state.ensemble
        await ensemble.loading_done.wait()
        transport = httpx.ASGITransport(app=manager.app)
        admin = httpx.ASGITransport(app=app.state.admin_app)
        async with (
            AppClient(transport=transport, base_url="http://test") as client,
            httpx.AsyncClient(transport=admin, base_url="http://admin") as client.admin,
        ):
            yield client


Body = Callable[[int, int], dict[str, Any]]
"""The body client ``i`` sends as its ``n``-th request."""


class Traffic:
    """Clients sending requests to an app until stopped; every answer's status kept (599: a
    stream that did not end with ``[DONE]``, or carried an error). Every ``stream_every``-th
    request of a client streams (0: none do)."""

    def __init__(
        self, client: AppClient, body: Body, path: str, clients: int, stream_every: int
    ) -> None:
        self.client = client
        self.body, self.path, self.clients, self.stream_every = body, path, clients, stream_every
        self.statuses: list[int] = []
        self._stop = anyio.Event()

    async def run(self) -> None:
        async with anyio.create_task_group() as tasks:
            for i in range(self.clients):
                tasks.start_soon(self._loop, i)

    async def _loop(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            body = self.body(i, n)
            if not self.stream_every or n % self.stream_every:
                answer = await self.client.post(self.path, json=body, timeout=120)
                self.statuses.append(answer.status_code)
                continue
            async with self.client.stream(
                "POST", self.path, json=body | {"stream": True}, timeout=120
            ) as answer:
                text = (await answer.aread()).decode()
            whole = text.rstrip().endswith("data: [DONE]") and '"error"' not in text
            self.statuses.append(answer.status_code if whole else 599)

    def stop(self) -> None:
        self._stop.set()


@asynccontextmanager
async def under_load(
    client: AppClient,
    body: Body,
    *,
    path: str = "/v1/completions",
    clients: int = 3,
    stream_every: int = 0,
) -> AsyncIterator[Traffic]:
    """``Traffic`` running while the block runs."""
    traffic = Traffic(client, body, path, clients, stream_every)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(traffic.run)
        try:
            yield traffic
        finally:
            traffic.stop()


@pytest.fixture(name="client")
async def _client(settings: Settings) -> AsyncIterator[AppClient]:
    """The demo ensemble's app, in-process, lifespan entered and every model loaded."""
    async with serving(create_app(settings)) as client:
        yield client


@pytest.fixture(name="exporter")
def _exporter() -> InMemorySpanExporter:
    """The spans ``provider``'s tracers end, each as it ends."""
    return InMemorySpanExporter()


@pytest.fixture(name="provider")
def _provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_env() -> dict[str, str]:
    """The environment for a server process: no ENSEMBLE_OPS_* variables, and a server that
    stops at once on SIGTERM (the drain delay for load balancers has tests of its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENSEMBLE_OPS_")}
    return {**env, "ENSEMBLE_OPS_SERVER__DRAIN_DELAY_S": "0"}


@pytest.fixture(name="clean_env")
def _clean_env() -> dict[str, str]:
    """:func:`process_env`, for subprocesses."""
    return process_env()


class Recorded:
    """Every event of ``kinds`` published on ``bus``, in order (``of`` picks one kind)."""

    def __init__(self, bus: EventBus, *kinds: type[Any]) -> None:
        self.seen: list[Any] = []
        for kind in kinds:
            bus.subscribe(kind, self.seen.append)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.seen if isinstance(e, kind)]


class EngineWrapper:
    """A real engine behind a small fake at the Engine boundary: everything forwards to
    ``real``; a subclass changes only what a real model cannot produce on demand."""

    def __init__(self, real: LlamaEngine) -> None:
        self.real = real
        self.closed = False

    @property
    def name(self) -> str:
        return self.real.name

    @property
    def info(self) -> EngineInfo:
        return self.real.info

    @property
    def free_slots(self) -> int:
        return self.real.free_slots

    @property
    def step_started(self) -> float | None:
        return self.real.step_started

    @property
    def kv_usage(self) -> float:
        return self.real.kv_usage

    @property
    def kv_retained(self) -> float:
        return self.real.kv_retained

    def expected_wait_s(self, target_s: float) -> float:
        return self.real.expected_wait_s(target_s)

    def drain_batch_sizes(self) -> list[int]:
        return self.real.drain_batch_sizes()

    def scratch(self) -> Engine:
        return self.real.scratch()

    def tokenize(self, text: str) -> list[int]:
        return self.real.tokenize(text)

    def render_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        return self.real.render_chat(messages)

    def submit(
        self,
        tokens: list[int],
        params: GenerationParams,
        sink: SequenceSink,
        **options: Any,
    ) -> SequenceHandle:
        return self.real.submit(tokens, params, sink, **options)

    def complete(
        self,
        tokens: list[int],
        params: GenerationParams,
        on_text: OnText | None = None,
        *,
        target_s: float = 0.0,
    ) -> Completion:
        """Blocking, through this wrapper's own ``submit``."""
        return complete(self, tokens, params, on_text, target_s=target_s)

    def close(self) -> None:
        self.closed = True
        self.real.close()


class _Ended:
    """The handle of a sequence that ended as it was submitted."""

    def cancel(self) -> None:
        pass


class FlakyEngine(EngineWrapper):
    """A real engine whose decodes fail while ``failing`` is set (a real model cannot be
    made to fail on demand and then recover)."""

    def __init__(self, real: LlamaEngine, *, failing: bool = True) -> None:
        super().__init__(real)
        self.failing = failing
        self.calls = 0

    def submit(
        self,
        tokens: list[int],
        params: GenerationParams,
        sink: SequenceSink,
        **options: Any,
    ) -> SequenceHandle:
        self.calls += 1
        if self.failing:
            sink.end(EngineFailure("llama_decode returned -3"))
            return _Ended()
        return super().submit(tokens, params, sink, **options)


class FailsMidStream(EngineWrapper):
    """An engine that sends one piece and then fails: a decode failing mid-answer, which a
    real model cannot do on demand."""

    def submit(
        self,
        tokens: list[int],
        params: GenerationParams,
        sink: SequenceSink,
        **options: Any,
    ) -> SequenceHandle:
        sink.piece("partial")
        sink.end(EngineFailure("decode failed mid-way"))
        return _Ended()


class _Parked:
    """The handle of a sequence waiting at a gate: cancelling it there ends it there."""

    def __init__(self) -> None:
        self.cancelled = False
        self.inner: SequenceHandle | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.inner is not None:
            self.inner.cancel()


class GatedEngine(EngineWrapper):
    """A real engine whose sequences wait at a gate (``release``) before they reach it: a
    member busy, or a copy hanging, for exactly as long as a test needs, which a real model
    cannot do on demand. ``arrived`` is set when a sequence reaches the gate."""

    def __init__(self, real: LlamaEngine, release: threading.Event | None = None) -> None:
        super().__init__(real)
        self.release = release or threading.Event()
        self.arrived = threading.Event()
        self.calls = 0

    def submit(
        self,
        tokens: list[int],
        params: GenerationParams,
        sink: SequenceSink,
        **options: Any,
    ) -> SequenceHandle:
        self.calls += 1
        handle = _Parked()

        def after_the_gate() -> None:
            self.hold()
            if handle.cancelled:
                sink.end(EngineFailure("cancelled", cancelled=True))
                return
            handle.inner = self.real.submit(tokens, params, sink, **options)
            if handle.cancelled:  # cancelled while it was being handed over
                handle.inner.cancel()

        threading.Thread(target=after_the_gate, daemon=True).start()
        self.arrived.set()
        return handle

    def hold(self) -> None:
        """Runs on the sequence's own thread until it may reach the engine."""
        self.release.wait()


class DelayedEngine(GatedEngine):
    """A real engine that starts each sequence ``delay_s`` late: a copy slower than the one
    serving by construction (two small real models differ by an amount that depends on the
    machine, and a gate judging it would be decided by timing)."""

    def __init__(self, real: LlamaEngine, delay_s: float) -> None:
        super().__init__(real)
        self.delay_s = delay_s

    def hold(self) -> None:
        time.sleep(self.delay_s)


def route(
    ensemble: Ensemble, model: str, mode: ModeName = "fast", session: str | None = None
) -> list[str]:
    """The members routing tries for a completion to ``model`` in ``mode``, in order."""
    request = InferenceRequest(
        model, mode, GenerationParams(4, 0.0, 1.0), prompt="Hello", session=session
    )
    return [slot.name for slot in ensemble.router.route(request)]
