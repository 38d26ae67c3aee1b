"""GGUF checks that keep a bad file from crashing or confusing the server."""

from __future__ import annotations

from pathlib import Path

import pytest

from ensemble_ops.errors import InvalidModelFileError
from ensemble_ops.serving.demo import DemoModel, write_model
from ensemble_ops.serving.gguf_check import inspect_gguf

from ..conftest import NO_BYTE_TOKENS


class TestInspect:
    def test_demo_model_passes(self, demo_dir: Path) -> None:
        """A good file reports its architecture, vocabulary and context length."""
        info = inspect_gguf(demo_dir / "demo-tiny.gguf")
        assert info.architecture == "llama"
        assert info.tokenizer_model == "llama"
        assert info.context_length == 2048
        assert info.vocab_size > 256

    def test_missing_file(self, tmp_path: Path) -> None:
        """A path with no file is refused by name."""
        with pytest.raises(InvalidModelFileError, match="file not found"):
            inspect_gguf(tmp_path / "absent.gguf")

    def test_not_gguf(self, tmp_path: Path) -> None:
        """Any other file is refused on its magic number."""
        path = tmp_path / "x.gguf"
        path.write_bytes(b"PK\x03\x04 not a model")
        with pytest.raises(InvalidModelFileError, match="bad magic"):
            inspect_gguf(path)

    def test_truncated_header(self, demo_dir: Path, tmp_path: Path) -> None:
        """A file cut inside its metadata is refused as corrupt."""
        path = tmp_path / "cut.gguf"
        path.write_bytes((demo_dir / "demo-tiny.gguf").read_bytes()[:300])
        with pytest.raises(InvalidModelFileError, match="corrupt or truncated"):
            inspect_gguf(path)

    def test_vocabulary_without_byte_tokens_is_refused(self, demo_dir: Path) -> None:
        """llama.cpp would abort the process on such a vocabulary, so it never loads."""
        with pytest.raises(
            InvalidModelFileError, match=r"SentencePiece vocabulary lacks \d+ of the 256 byte"
        ):
            inspect_gguf(demo_dir / NO_BYTE_TOKENS.filename)

    def test_unknown_architecture(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """An architecture llama.cpp does not know is refused before loading."""
        import gguf

        real = gguf.GGUFWriter

        def writer(path: str, arch: str, **kwargs: object) -> gguf.GGUFWriter:
            return real(path, "no-such-arch", **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(gguf, "GGUFWriter", writer)
        path = write_model(DemoModel("odd", 64, 1, 64, 4, seed=1), tmp_path / "odd.gguf")
        with pytest.raises(InvalidModelFileError, match="unsupported architecture 'no-such-arch'"):
            inspect_gguf(path)
