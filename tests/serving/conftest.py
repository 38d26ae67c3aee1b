"""Three members on real engines behind small fakes, for the request path's stage tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from ensemble_ops.config import ModelSpec, ModeName, Settings
from ensemble_ops.errors import EngineError
from ensemble_ops.events import (
    CacheLookedUp,
    EventBus,
    InferenceFailed,
    InferenceFinished,
    ModelLoaded,
    ModelLoadFailed,
    ModelUnloaded,
)
from ensemble_ops.serving.engine import (
    ChatMessage,
    GenerationParams,
    SequenceHandle,
    SequenceSink,
)
from ensemble_ops.serving.ensemble import Ensemble, InferenceRequest
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.tasks import TaskRunner

from ..conftest import FlakyEngine, Recorded

MEMBERS = ("a", "b", "c")
GREEDY = GenerationParams(max_tokens=4, temperature=0.0, top_p=1.0)
SAMPLED = GenerationParams(max_tokens=4, temperature=0.9, top_p=1.0)


class Events(Recorded):
    """Everything the ensemble publishes, in order."""

    def __init__(self, bus: EventBus) -> None:
        super().__init__(
            bus,
            CacheLookedUp,
            InferenceFailed,
            InferenceFinished,
            ModelLoaded,
            ModelLoadFailed,
            ModelUnloaded,
        )


class Member(FlakyEngine):
    """A member's real engine that counts sequences, fails while ``failing`` is set or for
    its next ``fail_next`` sequences, and records what each sequence was asked."""

    def __init__(self, real: LlamaEngine) -> None:
        super().__init__(real, failing=False)
        self.fail_next = 0
        self.asked: list[tuple[GenerationParams, float]] = []
        self.turns: list[tuple[str, float]] = []
        """Each sequence's caller and weight in the engine's fair admission."""

    def submit(
        self,
        tokens: list[int],
        params: GenerationParams,
        sink: SequenceSink,
        **options: Any,
    ) -> SequenceHandle:
        self.asked.append((params, options.get("target_s", 0.0)))
        self.turns.append((options.get("caller", ""), options.get("weight", 1.0)))
        if self.fail_next:
            self.fail_next -= 1
            self.failing = True
            try:
                return super().submit(tokens, params, sink, **options)
            finally:
                self.failing = False
        return super().submit(tokens, params, sink, **options)


class Engines:
    """Loads the members' real engines, each behind a ``Member``; ``broken`` members fail to
    load at all."""

    def __init__(self) -> None:
        self.by_name: dict[str, Member] = {}
        self.broken: set[str] = set()

    def __call__(self, spec: ModelSpec) -> Member:
        if spec.name in self.broken:
            raise EngineError(spec.name, "cannot load")
        engine = Member(LlamaEngine.load(spec))
        self.by_name[spec.name] = engine
        return engine


def request(
    model: str = "ensemble",
    params: GenerationParams = GREEDY,
    prompt: str | None = "Hello",
    messages: tuple[ChatMessage, ...] = (),
    mode: ModeName = "fast",
) -> InferenceRequest:
    return InferenceRequest(model, mode, params, prompt=prompt, messages=messages)


def members(path: Path, *, queue_size: int = 0, **fields: Any) -> Settings:
    """Three members on the model at ``path``, each running one request and letting
    ``queue_size`` wait; the fast mode prefers c, then a."""
    return Settings.from_mapping(
        {
            "models": [
                {
                    "name": n,
                    "path": str(path),
                    "n_ctx": 256,
                    "queue_size": queue_size,
                    "parallel": 1,
                    **fields,
                }
                for n in MEMBERS
            ],
            "modes": {"fast": {"prefer": ["c", "a"]}},
        },
        environ={},
    )


@pytest.fixture(name="ensemble_settings")
def _ensemble_settings(demo_dir: Path) -> Settings:
    """The three members on the tiny demo model, none waiting beyond the one running."""
    return members(demo_dir / "demo-tiny.gguf")


@pytest.fixture(name="engines")
def _engines() -> Engines:
    return Engines()


@pytest.fixture(name="bus")
def _bus() -> EventBus:
    return EventBus()


@pytest.fixture(name="events")
def _events(bus: EventBus) -> Events:
    return Events(bus)


EnsembleFactory = Callable[..., Ensemble]


@pytest.fixture(name="make_ensemble")
async def _make_ensemble(
    ensemble_settings: Settings, bus: EventBus, engines: Engines
) -> AsyncIterator[EnsembleFactory]:
    """Builds ensembles over the three members; closes them and their tasks afterwards."""
    built: list[Ensemble] = []
    runner = TaskRunner()

    def make(settings: Settings = ensemble_settings, **options: Any) -> Ensemble:
        ensemble = Ensemble(settings, bus, engines, runner, **options)
        built.append(ensemble)
        return ensemble

    try:
        yield make
    finally:
        await runner.aclose()  # requests still walking are cancelled, their sequences too
        for ensemble in built:
            await ensemble.close(drain_timeout_s=1.0)


@pytest.fixture(name="ensemble")
async def _ensemble(make_ensemble: EnsembleFactory) -> Ensemble:
    """The three members, loaded."""
    ensemble = make_ensemble()
    await ensemble.load_all()
    return ensemble
