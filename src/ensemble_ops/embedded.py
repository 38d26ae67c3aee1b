"""The process-wide API for code that loads and calls models itself, without the server.

Everything process-wide lives here, built on first use and dropped by :func:`reset` (tests):
one event bus, the registered members, a health checker, a reload manager and the metrics,
wired like the app wires its own, so embedded reloads and health changes are logged and
counted too. The server never touches any of it: each app builds its own in
``ensemble_ops.http.app``.

::

    from ensemble_ops import embedded

    embedded.register_model("qwen", llama)          # a llama_cpp.Llama, or an Engine
    health = await embedded.check_model_health("qwen", run_inference=True)
    await embedded.reload_model("qwen")             # waits for completed or failed
    with embedded.get_metrics().track_inference_time("qwen", "fast"): ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from ensemble_ops.config import HealthSettings, ModelSpec, ReloadSettings
from ensemble_ops.events import EventBus
from ensemble_ops.health.checker import HealthChecker
from ensemble_ops.health.probe import Prober
from ensemble_ops.health.resources import ProcessResources
from ensemble_ops.health.status import ModelHealth
from ensemble_ops.health.view import HealthView
from ensemble_ops.health.watchdog import Watchdog
from ensemble_ops.observability.log_view import subscribe_log
from ensemble_ops.observability.metrics import Metrics
from ensemble_ops.reload.machine import LoaderFunc
from ensemble_ops.reload.manager import ReloadManager
from ensemble_ops.reload.status import ReloadStatus
from ensemble_ops.reload.warmup import WarmupFunc
from ensemble_ops.serving.engine import Engine
from ensemble_ops.serving.gpu import GpuMonitor
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.serving.slot import Loaded, ModelSlot, loaded_event
from ensemble_ops.tasks import TaskRunner

__all__ = [
    "check_all_models",
    "check_liveness",
    "check_model_health",
    "check_readiness",
    "configure",
    "get_health_checker",
    "get_metrics",
    "get_reload_manager",
    "record_cache_hit",
    "record_cache_miss",
    "record_error",
    "record_request",
    "register_model",
    "reload_model",
    "reset",
    "track_inference_time",
    "track_llm_request",
    "update_model_status",
]

P = ParamSpec("P")
R = TypeVar("R")


class _Process:
    """The process-wide objects, wired together once."""

    def __init__(self, health: HealthSettings, reload: ReloadSettings) -> None:
        self.bus = EventBus()
        self.slots: dict[str, ModelSlot] = {}
        self.runner = TaskRunner()
        self.gpu = GpuMonitor()
        self.metrics = Metrics()
        self.metrics.subscribe(self.bus)
        subscribe_log(self.bus)
        self.view = HealthView(self.bus, health, [])
        # Not started: embedded code owns no event loop to measure. Its verdict still sees
        # stuck inferences and leaked leases of the registered members.
        self.watchdog = Watchdog(health, self._instances, self.bus)
        self.health = HealthChecker(
            self.slots,
            self.view,
            Prober(
                self.bus,
                health,
                self.runner,
                lambda name: self.view.record(name).last_inference_s,
            ),
            ProcessResources(self.gpu),
            liveness=self.watchdog.verdict,
        )
        self.reload = ReloadManager(
            self.bus,
            self.slots,
            ReloadSettings(),
            self.runner,
            loader=LlamaEngine.load,
            gpu=self.gpu,
        )

    def _instances(self) -> list[Loaded]:
        return [slot.active for slot in self.slots.values() if slot.active is not None]


_process: _Process | None = None


def _get() -> _Process:
    global _process
    if _process is None:
        _process = _Process(HealthSettings(), ReloadSettings())
    return _process


def configure(
    *, health: HealthSettings | None = None, reload: ReloadSettings | None = None
) -> None:
    """Start afresh with these thresholds (``[health]`` and ``[reload]`` of the config file);
    members registered before are forgotten."""
    global _process
    reset()
    _process = _Process(health or HealthSettings(), reload or ReloadSettings())


def reset() -> None:
    """Forget every registered member and start afresh (for tests; models are not closed)."""
    global _process
    if _process is not None:
        _process.gpu.close()
    _process = None


# -- members ---------------------------------------------------------------------------------


def register_model(name: str, instance: Engine | Any, *, queue_size: int = 16) -> None:
    """Track ``instance`` (an Engine, or a loaded ``llama_cpp.Llama``) as member ``name``."""
    process = _get()
    engine: Engine
    if hasattr(instance, "create_completion"):  # a llama_cpp.Llama
        engine = LlamaEngine.from_llama(name, instance)
    else:
        engine = instance
    path = Path(getattr(instance, "model_path", name))
    # model_construct: the model is already loaded, so there is no file to check.
    slot = ModelSlot(ModelSpec.model_construct(name=name, path=path, queue_size=queue_size))
    process.slots[name] = slot
    process.bus.publish(loaded_event(slot.install(engine), 0.0))


# -- health ----------------------------------------------------------------------------------


def get_health_checker() -> HealthChecker:
    """The process-wide checker of the members registered here."""
    return _get().health


async def check_model_health(name: str, run_inference: bool = False) -> ModelHealth:
    return await _get().health.check_model_health(name, run_inference)


async def check_all_models(run_inference: bool = False) -> dict[str, ModelHealth]:
    return await _get().health.check_all_models(run_inference)


def check_readiness() -> tuple[bool, str | None]:
    """Ready when at least one registered member is loaded and not unhealthy."""
    return _get().health.check_readiness()


def check_liveness() -> tuple[bool, str | None]:
    """(alive, reason): dead when a registered member's inference or lease is stuck past
    the ``[health]`` hard limits. Event-loop lag is not judged here: embedded code owns no
    loop for a watchdog to measure."""
    return _get().health.check_liveness()


# -- reload ----------------------------------------------------------------------------------


def get_reload_manager() -> ReloadManager:
    """The process-wide reload manager of the members registered here."""
    return _get().reload


async def reload_model(
    model_name: str,
    loader_func: LoaderFunc | None = None,
    warmup_func: WarmupFunc | None = None,
    warmup_iterations: int | None = None,
) -> ReloadStatus:
    """Reload a registered member and wait for the outcome; the warm-up iterations default
    to the member's or ``[reload] warmup_iterations``, like the server's."""
    return await _get().reload.reload_model(model_name, loader_func, warmup_func, warmup_iterations)


# -- metrics ---------------------------------------------------------------------------------


def get_metrics() -> Metrics:
    """The process-wide metrics (render them with ``get_metrics().render([])``)."""
    return _get().metrics


def record_request(model: str, mode: str, status: str) -> None:
    _get().metrics.record_request(model, mode, status)


def record_error(model: str, error_type: str) -> None:
    _get().metrics.record_error(model, error_type)


def record_cache_hit() -> None:
    _get().metrics.record_cache_hit()


def record_cache_miss() -> None:
    _get().metrics.record_cache_miss()


def update_model_status(
    model: str,
    loaded: bool,
    memory_bytes: int | None = None,
    gpu_memory_bytes: int | None = None,
) -> None:
    _get().metrics.update_model_status(model, loaded, memory_bytes, gpu_memory_bytes)


@contextlib.contextmanager
def track_inference_time(model: str, mode: str) -> Iterator[None]:
    """Observe the block's duration in llm_inference_duration_seconds{model,mode}."""
    with _get().metrics.track_inference_time(model, mode):
        yield


def track_llm_request(model: str, mode: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator for sync or async functions: time it, count it as success or error."""
    return _get().metrics.track_llm_request(model, mode)
