"""The ensemble's members, the modes that pick among them, and splits between them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from ensemble_ops.config.base import NAME_PATTERN, Section
from ensemble_ops.config.quality import MemberQuality

__all__ = ["DEFAULT_MODES", "ModeName", "ModeSpec", "ModelSpec", "SplitSpec"]

ModeName = Literal["fast", "balanced", "creative"]


class ModeSpec(Section):
    """A request preset; explicit request fields override it."""

    max_tokens: Annotated[int, Field(gt=0)]
    temperature: Annotated[float, Field(ge=0, le=2)]
    top_p: Annotated[float, Field(gt=0, le=1)]
    prefer: Annotated[tuple[str, ...], Field(strict=False)] = ()
    """Members tried first, in order, for ``model: "ensemble"``; the rest follow."""
    latency_target_s: Annotated[float, Field(gt=0, strict=False)] = 3.0
    """The answer's latency target: requests are admitted, and given the cores, earliest
    deadline (arrival + target) first, across every member; one that cannot start before
    its target gets 503 with Retry-After at once instead of a late answer."""


DEFAULT_MODES: dict[ModeName, ModeSpec] = {
    "fast": ModeSpec(max_tokens=64, temperature=0.2, top_p=0.9, latency_target_s=2.5),
    "balanced": ModeSpec(max_tokens=128, temperature=0.7, top_p=0.95, latency_target_s=3.0),
    "creative": ModeSpec(max_tokens=256, temperature=1.0, top_p=1.0, latency_target_s=4.0),
}


class ModelSpec(Section):
    """One ensemble member: a GGUF file and how llama.cpp runs it."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    optional: bool = False
    """An optional member whose file is missing at start-up is reported unhealthy (and can
    be reloaded later) instead of stopping start-up. Declared before ``path``: its check
    reads it."""
    path: Annotated[Path, Field(strict=False)]
    n_ctx: Annotated[int, Field(ge=16)] = 4096
    n_gpu_layers: Annotated[int, Field(ge=-1)] = 0
    """-1 offloads every layer (needs a CUDA build of llama-cpp-python)."""
    n_threads: Annotated[int, Field(gt=0)] | None = None
    """CPU threads for generation; llama.cpp's default when unset."""
    n_batch: Annotated[int, Field(gt=0)] = 512
    """Tokens per decode step, all sequences together (prompt chunks included)."""
    parallel: Annotated[int, Field(ge=1, le=256)] = 4
    """Sequences decoded together in one batch; the KV cache holds n_ctx x parallel."""
    queue_size: Annotated[int, Field(ge=0)] = 16
    """Requests that may wait for this member beyond those it runs; past it: 503."""
    description: str = ""
    reload_strategy: Literal["side_by_side", "replace"] = "side_by_side"
    """side_by_side loads the new copy next to the old one and fails the reload when memory
    for two is short; replace then unloads the old copy first (the others serve meanwhile)."""
    warmup_prompt: str | None = None
    """Overrides reload.warmup_prompt for this member."""
    warmup_iterations: Annotated[int, Field(ge=1, le=100)] | None = None
    chat_template: Annotated[str, Field(min_length=1)] | None = None
    """A Jinja chat template (the syntax of a GGUF's ``tokenizer.chat_template``) that
    replaces the file's own, or lets a file without one chat."""
    quality: MemberQuality = MemberQuality()
    """This member's golden set and thresholds for the quality gate of its reloads."""

    @field_validator("path")
    @classmethod
    def _file_exists(cls, path: Path, info: ValidationInfo) -> Path:
        if not path.is_file() and not info.data.get("optional", False):
            raise ValueError(
                f"GGUF file not found: {path} (optional = true would start without it)"
            )
        return path


class SplitSpec(Section):
    """A model name of its own that shares requests among members by weight (A/B testing).

    Each request goes to one member, picked by its session key (the same key always gets
    the same member) in proportion to the weights; the others answer, by weight, when that
    one cannot. Weights are relative: ``{a = 70, b = 30}`` and ``{a = 7, b = 3}`` are alike.
    """

    weights: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]]
    """Member name -> its relative share of the split's sessions."""

    @field_validator("weights")
    @classmethod
    def _two_members(cls, weights: dict[str, float]) -> dict[str, float]:
        if len(weights) < 2:
            raise ValueError(f"a split needs at least two members, not {len(weights)}")
        return weights
