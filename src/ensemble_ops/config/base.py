"""What every config section shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["NAME_PATTERN", "Section"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""What a member's name, and a split's, may be: it is a ``model`` in requests and a label."""


class Section(BaseModel):
    """A table of the config: unknown keys refused, frozen, and strict types."""

    # strict: TOML already gives typed values; "8000" for a port is a mistake worth naming.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
