"""LlamaEngine over real generated models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from ensemble_ops.config import ModelSpec
from ensemble_ops.errors import EngineError, InvalidModelFileError, InvalidRequestError
from ensemble_ops.serving.demo import DemoModel, write_model
from ensemble_ops.serving.engine import ChatMessage, GenerationParams, plain_transcript
from ensemble_ops.serving.llama_engine import LlamaEngine

from ..conftest import BYTE_SAMPLER, NO_BYTE_TOKENS

_NO_SYSTEM_TEMPLATE = (  # Mistral-style: alternating turns, no system role
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)


def _spec(path: Path, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": path.stem, "path": path, "n_ctx": 512, **fields})


@pytest.fixture(name="tiny", scope="module")
def _tiny(demo_dir: Path) -> LlamaEngine:
    return LlamaEngine.load(_spec(demo_dir / "demo-tiny.gguf"))


class TestMaxTokens:
    SEEDS = range(12)

    def test_library_overshoots_on_multibyte_output(self, demo_dir: Path) -> None:
        """The problem: plain llama-cpp-python generates past max_tokens on invalid UTF-8."""
        llm = llama_cpp.Llama(str(demo_dir / BYTE_SAMPLER.filename), n_ctx=512, verbose=False)
        counts = []
        try:
            for seed in self.SEEDS:
                out: Any = llm.create_completion("Hello", max_tokens=16, temperature=1.0, seed=seed)
                counts.append(out["usage"]["completion_tokens"])
        finally:
            llm.close()
        assert max(counts) > 16

    def test_engine_holds_max_tokens_exactly(self, demo_dir: Path) -> None:
        """The same model and requests through the engine stop at max_tokens, streamed or not."""
        engine = LlamaEngine.load(_spec(demo_dir / BYTE_SAMPLER.filename))
        try:
            for seed in self.SEEDS:
                params = GenerationParams(max_tokens=16, temperature=1.0, top_p=1.0, seed=seed)
                result = engine.complete(engine.tokenize("Hello"), params)
                streamed = engine.complete(engine.tokenize("Hello"), params, lambda _: None)
                assert (result.completion_tokens, result.finish_reason) == (16, "length")
                assert (streamed.completion_tokens, streamed.finish_reason) == (16, "length")
        finally:
            engine.close()


class TestGeneration:
    def test_stream_matches_non_stream(self, tiny: LlamaEngine) -> None:
        """With a fixed seed, streamed pieces join to the non-streamed text."""
        params = GenerationParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=42)
        whole = tiny.complete(tiny.tokenize("The ensemble"), params)
        pieces: list[str] = []
        streamed = tiny.complete(tiny.tokenize("The ensemble"), params, pieces.append)
        assert "".join(pieces) == whole.text == streamed.text
        assert len(pieces) > 1
        assert streamed.completion_tokens == whole.completion_tokens == 12

    def test_stop_sequence(self, tiny: LlamaEngine) -> None:
        """Generation stops before a stop string and says so."""
        params = GenerationParams(max_tokens=40, temperature=0.0, top_p=1.0)
        free = tiny.complete(tiny.tokenize("Hello"), params).text
        stop_word = free.split()[3]
        cut = GenerationParams(max_tokens=40, temperature=0.0, top_p=1.0, stop=(stop_word,))
        result = tiny.complete(tiny.tokenize("Hello"), cut)
        assert result.finish_reason == "stop"
        assert stop_word not in result.text
        assert free.startswith(result.text)

    def test_on_text_failure_stops_generation(self, tiny: LlamaEngine) -> None:
        """When the consumer raises (a client gone), generation ends at once."""
        seen: list[str] = []

        def consumer(piece: str) -> None:
            seen.append(piece)
            if len(seen) == 2:
                raise BrokenPipeError("client went away")

        params = GenerationParams(max_tokens=200, temperature=0.5, top_p=1.0)
        with pytest.raises(BrokenPipeError):
            tiny.complete(tiny.tokenize("Hi"), params, consumer)
        assert len(seen) == 2
        # and the instance is usable right after
        assert tiny.complete(tiny.tokenize("Hi"), params).completion_tokens == 200

    def test_chat_uses_the_model_template(self, tiny: LlamaEngine) -> None:
        """Chat messages are rendered with the GGUF's chat template."""
        prompt = tiny.render_chat([ChatMessage("user", "hello")])
        text = tiny.detokenize(prompt.tokens)
        assert text.endswith("user: hello\nassistant:")

    def test_model_without_a_template_gets_the_plain_transcript(self, tmp_path: Path) -> None:
        """A GGUF with no chat template chats in the documented ``role: content`` transcript."""
        model = DemoModel("untemplated", 64, 2, 192, 4, seed=1, chat_template="")
        engine = LlamaEngine.load(_spec(write_model(model, tmp_path / model.filename)))
        try:
            messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "hello")]
            prompt = engine.render_chat(messages)
            text = engine.detokenize(prompt.tokens)
            assert text.removeprefix("<s>").lstrip() == plain_transcript(messages)
            assert prompt.stop == ("\nuser:", "\nsystem:")
            result = engine.complete(prompt.tokens, GenerationParams(4, 0.0, 1.0))
            assert result.completion_tokens == 4
        finally:
            engine.close()

    def test_template_without_system_role_gets_it_in_the_first_user_turn(
        self, tmp_path: Path
    ) -> None:
        """A template that raises on system messages (as Gemma's and Mistral's do) still
        serves them, folded into the first user message."""
        model = DemoModel("no-system", 64, 2, 192, 4, seed=1, chat_template=_NO_SYSTEM_TEMPLATE)
        engine = LlamaEngine.load(_spec(write_model(model, tmp_path / model.filename)))
        try:
            prompt = engine.render_chat(
                [ChatMessage("system", "Be brief."), ChatMessage("user", "hello")]
            )
            text = engine.detokenize(prompt.tokens)
            assert text.endswith("[INST] Be brief.\n\nhello [/INST]")
            with pytest.raises(InvalidRequestError, match="refuses these messages") as refused:
                engine.render_chat([ChatMessage("assistant", "hi"), ChatMessage("user", "x")])
            assert refused.value.param == "messages"
        finally:
            engine.close()

    def test_info(self, tiny: LlamaEngine) -> None:
        """llama.cpp's own sizes are reported."""
        assert tiny.info.n_ctx == 512
        assert tiny.info.weights_bytes > 500_000
        assert tiny.info.context_bytes > 0
        assert tiny.info.gpu_offload is False


class TestLoading:
    def test_refuses_vocabulary_that_would_abort(self, demo_dir: Path) -> None:
        """A vocabulary without byte tokens is refused before llama.cpp sees it."""
        with pytest.raises(InvalidModelFileError, match="byte tokens"):
            LlamaEngine.load(_spec(demo_dir / NO_BYTE_TOKENS.filename))

    def test_that_vocabulary_really_aborts_llama_cpp(self, demo_dir: Path) -> None:
        """Why the check exists: llama.cpp kills the whole process on such a file."""
        code = (
            "import llama_cpp, sys\n"
            f"llm = llama_cpp.Llama({str(demo_dir / NO_BYTE_TOKENS.filename)!r}, verbose=False)\n"
            "llm.tokenize('price: 5 \N{EURO SIGN}'.encode())\n"
            "print('survived')\n"
        )
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # no gdb dump of the crash
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, env=env)
        assert run.returncode == -signal.SIGABRT
        assert b"out_of_range" in run.stderr

    def test_corrupt_file_is_an_engine_error(self, demo_dir: Path, tmp_path: Path) -> None:
        """A GGUF cut in half is refused with a clear error, never half-loaded."""
        path = tmp_path / "cut.gguf"
        data = (demo_dir / "demo-small.gguf").read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises((EngineError, InvalidModelFileError), match=r"cannot load|corrupt"):
            LlamaEngine.load(_spec(path))
