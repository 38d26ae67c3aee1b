"""ensemble-ops: the operations layer for self-hosted LLM ensembles.

The public Python API: build the app (``create_app``) from ``Settings``, or use the
process-wide API of ``ensemble_ops.embedded`` around models you load yourself.
"""

from ensemble_ops import embedded
from ensemble_ops._version import __version__
from ensemble_ops.config import ModelSpec, ModeSpec, Settings
from ensemble_ops.errors import ConfigError, EnsembleOpsError
from ensemble_ops.events import EventBus
from ensemble_ops.health.checker import HealthChecker
from ensemble_ops.health.status import HealthStatus, ModelHealth
from ensemble_ops.http.app import create_app
from ensemble_ops.reload.manager import ReloadManager
from ensemble_ops.reload.status import ReloadStatus
from ensemble_ops.serving.engine import Engine
from ensemble_ops.serving.ensemble import Ensemble
from ensemble_ops.serving.llama_engine import LlamaEngine

__all__ = [
    "ConfigError",
    "Engine",
    "Ensemble",
    "EnsembleOpsError",
    "EventBus",
    "HealthChecker",
    "HealthStatus",
    "LlamaEngine",
    "ModeSpec",
    "ModelHealth",
    "ModelSpec",
    "ReloadManager",
    "ReloadStatus",
    "Settings",
    "__version__",
    "create_app",
    "embedded",
]
