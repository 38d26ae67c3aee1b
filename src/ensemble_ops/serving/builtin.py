"""The built-in ensembles: real models from PyPI by default, generated demo models offline.

These build ordinary :class:`~ensemble_ops.config.Settings`, so flags and ``ENSEMBLE_OPS_*``
overrides apply to them as to a config file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ensemble_ops.config import Settings, shipped_golden_set
from ensemble_ops.serving.demo import DEMO_MEMBERS, ensure_demo_models
from ensemble_ops.serving.real_models import (
    GEMMA3_270M,
    REAL_MEMBERS,
    SMOLLM2_135M,
    ModelFetchError,
    ensure_real_models,
    model_cache_dir,
)

__all__ = ["default_settings", "demo_settings", "real_settings"]


def demo_settings(
    directory: Path | None = None, *, environ: Mapping[str, str] | None = None
) -> Settings:
    """The generated demo ensemble: three random-weight models, smallest first.

    No download and no language: what the test suite and ``serve --demo`` run on.
    """
    paths = ensure_demo_models(directory)
    names = [m.name for m in DEMO_MEMBERS]
    models = [
        {
            "name": name,
            "path": str(paths[name]),
            "n_ctx": 2048,
            "description": "generated demo model (random weights, not a real LLM)",
        }
        for name in names
    ]
    tiny, small, base = names
    modes = {
        "fast": {"prefer": [tiny, small]},
        "balanced": {"prefer": [small, base]},
        "creative": {"prefer": [base, small]},
    }
    return Settings.from_mapping({"models": models, "modes": modes}, environ=environ)


def real_settings(
    paths: Mapping[str, Path],
    *,
    environ: Mapping[str, str] | None = None,
    require_files: bool = True,
) -> Settings:
    """The default ensemble of real models (``paths`` from :func:`ensure_real_models`).

    The instruct model serves ``fast`` and ``balanced``; the base model continues text and
    comes first for ``creative``. ``require_files=False`` validates the rest (flags and
    ``ENSEMBLE_OPS_*`` overrides) before the files exist.
    """
    models = [
        {
            "name": model.name,
            "path": str(paths[model.name]),
            "n_ctx": model.n_ctx,
            # Eight sequences per step: what llama-server reaches with -np 8 on these small
            # models, at about 400 MB of KV cache each (docs/performance.md).
            "parallel": 8,
            "description": f"{model.description}; licence: {model.licence}",
            "optional": not require_files,
        }
        for model in REAL_MEMBERS
    ]
    instruct, base = SMOLLM2_135M.name, GEMMA3_270M.name
    # Each member's reloads pass the shipped set that fits it; the floors are the pass rates
    # measured on these files (16/20 and 17/20, docs/quality.md) less a margin of two cases.
    quality = {
        instruct: {"golden_set": str(shipped_golden_set("chat")), "min_pass_rate": 0.7},
        base: {"golden_set": str(shipped_golden_set("completion")), "min_pass_rate": 0.75},
    }
    for model in models:
        model["quality"] = quality[str(model["name"])]
    modes = {
        "fast": {"prefer": [instruct, base]},
        "balanced": {"prefer": [instruct, base]},
        "creative": {"prefer": [base, instruct]},
    }
    return Settings.from_mapping({"models": models, "modes": modes}, environ=environ)


def default_settings(*, environ: Mapping[str, str] | None = None) -> tuple[Settings, str | None]:
    """The zero-config ensemble: the real models, or the demo ones when they cannot be had.

    Returns the settings and, when it fell back to the demo models, why.
    """
    directory = model_cache_dir()
    # A bad flag or override fails now, not after a download of hundreds of megabytes.
    real_settings(
        {m.name: directory / m.filename for m in REAL_MEMBERS},
        environ=environ,
        require_files=False,
    )
    try:
        paths = ensure_real_models(directory)
    except ModelFetchError as err:
        return demo_settings(environ=environ), str(err)
    return real_settings(paths, environ=environ), None
