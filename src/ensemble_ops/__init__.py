"""ensemble-ops: the operations layer for self-hosted LLM ensembles."""

from ._version import __version__
from .app import create_app
from .config import ModelSpec, ModeSpec, Settings
from .engine import Engine, LlamaEngine
from .ensemble import Ensemble
from .errors import ConfigError, EnsembleOpsError
from .events import EventBus

__all__ = [
    "ConfigError",
    "Engine",
    "Ensemble",
    "EnsembleOpsError",
    "EventBus",
    "LlamaEngine",
    "ModeSpec",
    "ModelSpec",
    "Settings",
    "__version__",
    "create_app",
]
