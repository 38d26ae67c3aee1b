"""The admin request bodies: a reload, and how its new copy takes over (the rollout)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.json_schema import SkipJsonSchema

from ensemble_ops.config import GateSpec, QualityThresholds, RolloutKind, RolloutSpec
from ensemble_ops.errors import InvalidRequestError
from ensemble_ops.http.protocol.responses import no_default

__all__ = ["ReloadBody"]


def _optional(description: str) -> Any:
    return Field(default=None, description=description, json_schema_extra=no_default)


class ReloadBody(BaseModel):
    """``POST /admin/models/{model}/reload``: every field optional, nothing else allowed.

    The rollout fields override ``[reload.rollout]`` for this reload only.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    # Left out means the member's own setting; null is not a value (a 400, like any other).
    path: Annotated[str, Field(min_length=1)] | SkipJsonSchema[None] = _optional(
        "A GGUF file inside the model directory (default: the member's)."
    )
    warmup_iterations: Annotated[int, Field(ge=1, le=100)] | SkipJsonSchema[None] = _optional(
        "Warm-up inferences before the new copy serves."
    )
    rollout: RolloutKind | SkipJsonSchema[None] = _optional(
        "switch (all at once), canary (step by step behind gates), shadow (mirrored, then "
        "switch or canary) or blue_green (wait for promote)."
    )
    steps: list[Annotated[float, Field(strict=False)]] | SkipJsonSchema[None] = _optional(
        "Canary: the new copy's share of requests at each step, increasing, each under 100."
    )
    min_requests: int | SkipJsonSchema[None] = _optional(
        "Canary/shadow: answers from the new copy before a step is judged."
    )
    min_seconds: Annotated[float, Field(strict=False)] | SkipJsonSchema[None] = _optional(
        "Canary/shadow: the least time a step is held."
    )
    gates: GateSpec | SkipJsonSchema[None] = _optional(
        "Limits for the new copy against the old one (unknown gates are refused)."
    )
    failure_budget: int | SkipJsonSchema[None] = _optional(
        "Consecutive failed checks before rolling back."
    )
    deadline_s: Annotated[float, Field(strict=False)] | SkipJsonSchema[None] = _optional(
        "A rollout still undecided after this long rolls back."
    )
    shadow_percent: Annotated[float, Field(strict=False)] | SkipJsonSchema[None] = _optional(
        "Shadow: the share of requests mirrored to the new copy."
    )
    after_shadow: Literal["switch", "canary"] | SkipJsonSchema[None] = _optional(
        "Shadow: switch or canary once the gates pass."
    )
    promote_timeout_s: Annotated[float, Field(strict=False)] | SkipJsonSchema[None] = _optional(
        "Blue-green: roll back when not promoted within this long."
    )
    allow_capability_change: bool = Field(
        default=False,
        description="Let the new copy lack what the member's copy can do (chat, for a file "
        "without a chat template); otherwise such a copy fails at warm-up.",
    )

    quality: QualityThresholds | Literal[False] | SkipJsonSchema[None] = _optional(
        "The quality gate's thresholds for this reload ({min_pass_rate, max_drop}), or false "
        "to skip it (logged); it runs when the member has a golden set."
    )

    _FIELDS: ClassVar[str] = (
        "path, warmup_iterations, rollout, steps, min_requests, min_seconds, gates, "
        "failure_budget, deadline_s, shadow_percent, after_shadow, promote_timeout_s, "
        "allow_capability_change, quality"
    )

    @field_validator("*", mode="before")
    @classmethod
    def reject_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("null is not a value; leave the field out")
        return value

    @field_validator("quality", mode="before")
    @classmethod
    def _quality_shape(cls, value: object) -> object:
        if value is False or isinstance(value, dict):
            return value
        raise ValueError("false (skip the gate) or an object with min_pass_rate, max_drop")

    @classmethod
    def parse(cls, data: Any) -> ReloadBody:
        """Validate a decoded JSON body; raise :class:`InvalidRequestError` naming the field."""
        if not isinstance(data, dict):
            raise InvalidRequestError(f"The body must be a JSON object with: {cls._FIELDS}.")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise _named(err) from err

    def rollout_spec(self, default: RolloutSpec) -> RolloutSpec:
        """This reload's rollout: ``default`` with the fields given here."""
        given = self.model_dump(
            exclude_none=True,
            exclude={"path", "warmup_iterations", "allow_capability_change", "quality"},
        )
        if "rollout" in given:
            given["kind"] = given.pop("rollout")
        if self.gates is not None:  # the gates given, on top of the default ones
            given["gates"] = {
                **default.gates.model_dump(),
                **self.gates.model_dump(exclude_unset=True),
            }
        try:
            return RolloutSpec.model_validate({**default.model_dump(), **given})
        except ValidationError as err:
            raise _named(err) from err


def _named(err: ValidationError) -> InvalidRequestError:
    """One 400 naming the first problem's field: ``steps: steps must increase``."""
    problem = err.errors()[0]
    # Without the union members' tags pydantic adds ("GateSpec", "literal[...]").
    loc = [str(p) for p in problem["loc"] if not (str(p)[:1].isupper() or "[" in str(p))]
    field = ".".join(loc) if loc else "body"
    if field == "kind":
        field = "rollout"
    if problem["type"] == "extra_forbidden":
        what = {"gates": "gate", "quality": "quality threshold"}.get(loc[0] if loc else "", "field")
        known = {
            "gate": ", ".join(GateSpec.model_fields),
            "quality threshold": ", ".join(QualityThresholds.model_fields),
        }.get(what, ReloadBody._FIELDS)
        reason = f"unknown {what} (known: {known})"
    else:
        reason = str(problem["msg"]).removeprefix("Value error, ")
    param = "rollout" if loc[:1] == ["kind"] else (loc[0] if loc else None)
    return InvalidRequestError(f"{field}: {reason}", param=param)
