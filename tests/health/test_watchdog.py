"""The liveness watchdog's verdicts on a stuck process."""

from __future__ import annotations

import time
from pathlib import Path

from ensemble_ops.config import HealthSettings, ModelSpec
from ensemble_ops.health.watchdog import Watchdog
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.serving.slot import Loaded

from ..conftest import EngineWrapper


class _HungStep(EngineWrapper):
    """A real engine reporting a decode step that started long ago: a hung llama_decode,
    which a real model cannot produce on demand."""

    def __init__(self, real: LlamaEngine, started: float) -> None:
        super().__init__(real)
        self.started = started

    @property
    def step_started(self) -> float | None:
        return self.started


class TestWatchdog:
    async def test_a_decode_step_past_the_hard_limit_is_a_stuck_process(
        self, demo_dir: Path
    ) -> None:
        """A step running longer than inference_hard_limit_s fails liveness, naming the
        member; the same step within the limit does not."""
        spec = ModelSpec.model_validate(
            {"name": "demo-tiny", "path": demo_dir / "demo-tiny.gguf", "n_ctx": 128}
        )
        engine = _HungStep(LlamaEngine.load(spec), started=time.monotonic() - 20.0)
        loaded = Loaded("demo-tiny", engine)
        try:
            stuck = Watchdog(HealthSettings(inference_hard_limit_s=10.0), lambda: [loaded])
            patient = Watchdog(HealthSettings(inference_hard_limit_s=60.0), lambda: [loaded])
            verdict = stuck.verdict()
            assert verdict is not None
            assert verdict.startswith("a decode step of demo-tiny has run for 20 s")
            assert patient.verdict() is None
        finally:
            await loaded.close()
