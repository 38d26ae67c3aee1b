"""Settings: one validated object from a TOML file plus ``ENSEMBLE_OPS_*`` overrides.

The sections are declared by concern (``sections``, ``members``, ``rollout``) and read in one
place (``settings``); everything is importable from here.
"""

from ensemble_ops.config.access import ApiKeySpec, AuthSettings
from ensemble_ops.config.golden import (
    GoldenCase,
    GoldenSet,
    GoldenSetError,
    load_golden_set,
    shipped_golden_set,
)
from ensemble_ops.config.members import ModelSpec, ModeName, ModeSpec, SplitSpec
from ensemble_ops.config.quality import (
    DEFAULT_MIN_PASS_RATE,
    MemberQuality,
    QualitySettings,
    QualityThresholds,
)
from ensemble_ops.config.rollout import GATES, GateSpec, ReloadSettings, RolloutKind, RolloutSpec
from ensemble_ops.config.sections import (
    CacheSettings,
    HealthSettings,
    LoggingSettings,
    MetricsSettings,
    ServerSettings,
    TracingSettings,
    admin_address,
    is_loopback,
)
from ensemble_ops.config.settings import ENV_PREFIX, Settings

__all__ = [
    "DEFAULT_MIN_PASS_RATE",
    "ENV_PREFIX",
    "GATES",
    "ApiKeySpec",
    "AuthSettings",
    "CacheSettings",
    "GateSpec",
    "GoldenCase",
    "GoldenSet",
    "GoldenSetError",
    "HealthSettings",
    "LoggingSettings",
    "MemberQuality",
    "MetricsSettings",
    "ModeName",
    "ModeSpec",
    "ModelSpec",
    "QualitySettings",
    "QualityThresholds",
    "ReloadSettings",
    "RolloutKind",
    "RolloutSpec",
    "ServerSettings",
    "Settings",
    "SplitSpec",
    "TracingSettings",
    "admin_address",
    "is_loopback",
    "load_golden_set",
    "shipped_golden_set",
]
