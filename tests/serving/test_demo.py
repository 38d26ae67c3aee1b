"""Generated demo models: deterministic, printable, and honest about being demos."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import llama_cpp

from ensemble_ops.serving.demo import DEMO_MEMBERS, ensure_demo_models, write_model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TestDemoModels:
    def test_generation_is_deterministic(self, demo_dir: Path, tmp_path: Path) -> None:
        """Writing a member again gives the same bytes."""
        tiny = DEMO_MEMBERS[0]
        again = write_model(tiny, tmp_path / tiny.filename)
        assert _digest(again) == _digest(demo_dir / tiny.filename)

    def test_three_members_of_different_sizes(self, demo_dir: Path) -> None:
        """The ensemble has three members, each larger than the last, named as demos."""
        sizes = [(demo_dir / m.filename).stat().st_size for m in DEMO_MEMBERS]
        assert sizes == sorted(sizes)
        assert len(set(sizes)) == 3
        assert all(m.name.startswith("demo-") for m in DEMO_MEMBERS)

    def test_cache_is_reused(self, tmp_path: Path) -> None:
        """A second call finds the files and does not rewrite them."""
        first = ensure_demo_models(tmp_path)
        stamps = {name: path.stat().st_mtime_ns for name, path in first.items()}
        second = ensure_demo_models(tmp_path)
        assert {name: p.stat().st_mtime_ns for name, p in second.items()} == stamps

    def test_llama_cpp_runs_them_with_printable_text(self, demo_dir: Path) -> None:
        """Each member loads in llama.cpp and writes printable text within max_tokens."""
        for member in DEMO_MEMBERS:
            llm = llama_cpp.Llama(str(demo_dir / member.filename), n_ctx=256, verbose=False)
            try:
                out: Any = llm.create_completion(
                    "Hello there", max_tokens=16, temperature=1.0, seed=7
                )
            finally:
                llm.close()
            text = out["choices"][0]["text"]
            assert out["usage"]["completion_tokens"] == 16
            assert text.strip(), repr(text)
            assert text.isprintable(), repr(text)
