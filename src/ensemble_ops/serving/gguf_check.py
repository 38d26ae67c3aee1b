"""Checks on a GGUF file before llama.cpp sees it.

llama.cpp trusts its input: a file with a bad header fails to load (fine), but a SentencePiece
(SPM) vocabulary without byte tokens loads and then *aborts the process* (an uncaught C++
``std::out_of_range`` in ``llama_vocab::byte_to_token``) on the first prompt that holds a
character outside the vocabulary. One user's bad file must not kill every member, so such a
file is refused here, from its metadata, before it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensemble_ops.errors import InvalidModelFileError

__all__ = ["GGUFInfo", "inspect_gguf"]

_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFInfo:
    """What the service needs to know about a GGUF file without loading it."""

    path: Path
    architecture: str
    name: str | None
    context_length: int | None
    vocab_size: int
    tokenizer_model: str
    size_bytes: int


def _missing_byte_tokens(tokenizer_model: str, tokens: list[str]) -> int:
    """How many of the 256 bytes an SPM vocabulary could not fall back to (0 = safe).

    Only the SentencePiece tokenizer ("llama") calls ``byte_to_token``, when a character is
    not in the vocabulary (its byte fallback). Byte-level BPE ("gpt2") skips bytes it has no
    token for, and the others never look bytes up, so they are safe whatever they hold.
    """
    if tokenizer_model != "llama":
        return 0
    vocab = set(tokens)
    return sum(1 for b in range(256) if f"<0x{b:02X}>" not in vocab and chr(b) not in vocab)


def inspect_gguf(path: Path) -> GGUFInfo:
    """Read and check ``path``'s header; raise :class:`InvalidModelFileError` if unsafe."""
    import gguf  # heavy import, only needed when a model is (re)loaded

    if not path.is_file():
        raise InvalidModelFileError(path, "file not found")
    with path.open("rb") as handle:
        if handle.read(4) != _GGUF_MAGIC:
            raise InvalidModelFileError(path, "not a GGUF file (bad magic number)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, IndexError, ... on bad bytes
        raise InvalidModelFileError(path, f"corrupt or truncated GGUF: {err}") from err

    def field(key: str) -> Any:
        entry = reader.fields.get(key)
        return None if entry is None else entry.contents()

    architecture = field("general.architecture")
    known = set(gguf.MODEL_ARCH_NAMES.values())
    if not isinstance(architecture, str) or architecture not in known:
        raise InvalidModelFileError(path, f"unsupported architecture {architecture!r}")
    tokenizer_model = field("tokenizer.ggml.model")
    tokens = field("tokenizer.ggml.tokens")
    if not isinstance(tokenizer_model, str) or not isinstance(tokens, list) or not tokens:
        raise InvalidModelFileError(path, "no tokenizer vocabulary in the metadata")
    missing = _missing_byte_tokens(tokenizer_model, tokens)
    if missing:
        raise InvalidModelFileError(
            path,
            f"the SentencePiece vocabulary lacks {missing} of the 256 byte tokens (<0xNN>); "
            "llama.cpp would abort the process on text outside the vocabulary",
        )
    context_length = field(f"{architecture}.context_length")
    name = field("general.name")
    return GGUFInfo(
        path=path,
        architecture=architecture,
        name=name if isinstance(name, str) else None,
        context_length=context_length if isinstance(context_length, int) else None,
        vocab_size=len(tokens),
        tokenizer_model=tokenizer_model,
        size_bytes=path.stat().st_size,
    )
