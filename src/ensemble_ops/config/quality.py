"""The quality gate's settings: which golden set a new copy must pass, and how well."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from ensemble_ops.config.base import Section

__all__ = ["DEFAULT_MIN_PASS_RATE", "MemberQuality", "QualitySettings", "QualityThresholds"]

DEFAULT_MIN_PASS_RATE = 0.8
"""The floor when no level sets ``min_pass_rate``."""


class QualityThresholds(Section):
    """How well a new copy must answer its golden set (a reload request may set these)."""

    min_pass_rate: Annotated[float, Field(ge=0, le=1, strict=False)] | None = None
    """The least share of cases passed; unset: the level above's (0.8 at the top)."""
    max_drop: Annotated[float, Field(ge=0, le=1, strict=False)] | None = None
    """How far below the serving copy's pass rate the new copy may be; unset: one case or
    10%, whichever is larger."""


class MemberQuality(QualityThresholds):
    """A member's own golden set and thresholds (``quality = {...}`` on a member)."""

    golden_set: Annotated[Path, Field(strict=False)] | None = None
    """Overrides ``[quality] golden_set`` for this member."""
    enabled: bool = True
    """false: this member's reloads run no quality gate."""


class QualitySettings(QualityThresholds):
    """``[quality]``: the gate every reload passes before its new copy takes traffic, on by
    default once a golden set is configured (here for every member, or on a member)."""

    golden_set: Annotated[Path, Field(strict=False)] | None = None
    """A JSON-lines golden set (docs/quality.md) for every member without its own."""
    min_pass_rate: Annotated[float, Field(ge=0, le=1, strict=False)] | None = DEFAULT_MIN_PASS_RATE

    def golden_set_for(self, member: MemberQuality) -> Path | None:
        """The golden set a member's reloads must pass (None: no quality gate)."""
        return (member.golden_set or self.golden_set) if member.enabled else None
