"""Routing: the members a request may go to, in order, by name, mode, health, capability
and context size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ensemble_ops.config import ModeName, Settings
from ensemble_ops.errors import (
    ContextLengthExceededError,
    ModelNotFoundError,
    NoMemberAvailableError,
)
from ensemble_ops.events import InferenceFailed, InferenceFinished
from ensemble_ops.serving.demo import DemoModel, write_model
from ensemble_ops.serving.engine import ChatMessage, GenerationParams
from ensemble_ops.serving.ensemble import Ensemble
from ensemble_ops.serving.routing import split_order

from ..conftest import EngineWrapper, route
from .conftest import EnsembleFactory, Events, request

CHAT = (ChatMessage("user", "Hello"),)
BASE = DemoModel("base", 64, 2, 192, 4, seed=1, chat_template="")
"""A model without a chat template: it can only continue text."""


def _mixed(tmp_path: Path, demo_dir: Path) -> Settings:
    """``base`` (no chat template, preferred by every mode) and ``instruct`` (ChatML)."""
    base = write_model(BASE, tmp_path / BASE.filename)
    return Settings.from_mapping(
        {
            "models": [
                {"name": "base", "path": str(base), "n_ctx": 256},
                {"name": "instruct", "path": str(demo_dir / "demo-tiny.gguf"), "n_ctx": 256},
            ],
            "modes": {mode: {"prefer": ["base"]} for mode in ("fast", "balanced", "creative")},
        },
        environ={},
    )


class TestOrder:
    async def test_a_named_member_is_the_only_candidate(self, ensemble: Ensemble) -> None:
        """A request naming a member goes to that member and no other."""
        assert route(ensemble, "b") == ["b"]
        assert (await ensemble.complete(request("b"))).member == "b"

    async def test_an_unknown_member_is_not_found(self, ensemble: Ensemble) -> None:
        """An unknown name is refused, naming the members there are."""
        named = "The model 'd' does not exist; choose one of: ensemble, a, b, c"
        with pytest.raises(ModelNotFoundError, match=named):
            route(ensemble, "d")
        with pytest.raises(ModelNotFoundError):
            await ensemble.complete(request("d"))

    async def test_the_mode_preference_comes_first_then_the_rest_in_config_order(
        self, ensemble: Ensemble
    ) -> None:
        """model "ensemble" tries the mode's preferred members, then the others as declared."""
        assert route(ensemble, "ensemble", "fast") == ["c", "a", "b"]
        assert route(ensemble, "ensemble", "creative") == ["a", "b", "c"]
        assert (await ensemble.complete(request())).member == "c"

    async def test_unfit_members_go_last_not_away(self, make_ensemble: EnsembleFactory) -> None:
        """Members the health view finds unfit are tried after every fit one, in order."""
        ensemble = make_ensemble(can_serve=lambda name: name not in ("c", "a"))
        await ensemble.load_all()
        assert route(ensemble, "ensemble", "fast") == ["b", "c", "a"]
        assert (await ensemble.complete(request())).member == "b"
        assert route(ensemble, "c") == ["c"]  # asked for by name: still served


class TestCapability:
    @pytest.mark.parametrize("mode", ["fast", "balanced", "creative"])
    async def test_a_chat_skips_a_member_that_cannot_chat(
        self,
        make_ensemble: EnsembleFactory,
        tmp_path: Path,
        demo_dir: Path,
        mode: ModeName,
    ) -> None:
        """Every mode prefers the base model; a chat to the ensemble goes to the member
        with a template all the same, while a completion still goes to the base model."""
        ensemble = make_ensemble(_mixed(tmp_path, demo_dir))
        await ensemble.load_all()
        chat = request("ensemble", prompt=None, messages=CHAT, mode=mode)
        assert (await ensemble.complete(chat)).member == "instruct"
        text = request("ensemble", mode=mode)
        assert (await ensemble.complete(text)).member == "base"

    async def test_a_member_named_for_a_chat_still_answers_it(
        self, make_ensemble: EnsembleFactory, tmp_path: Path, demo_dir: Path
    ) -> None:
        """Naming a member without a template still works: it gets the plain transcript."""
        ensemble = make_ensemble(_mixed(tmp_path, demo_dir))
        await ensemble.load_all()
        result = await ensemble.complete(request("base", prompt=None, messages=CHAT))
        assert result.member == "base"

    async def test_when_no_member_can_chat_the_ensemble_still_answers(
        self, make_ensemble: EnsembleFactory, tmp_path: Path
    ) -> None:
        """An ensemble of base models answers chats in the plain transcript rather than
        refusing them."""
        base = write_model(BASE, tmp_path / BASE.filename)
        settings = Settings.from_mapping(
            {"models": [{"name": n, "path": str(base), "n_ctx": 256} for n in ("x", "y")]},
            environ={},
        )
        ensemble = make_ensemble(settings)
        await ensemble.load_all()
        result = await ensemble.complete(request("ensemble", prompt=None, messages=CHAT))
        assert result.member == "x"

    async def test_a_chat_template_in_the_config_lets_a_member_chat(
        self, make_ensemble: EnsembleFactory, tmp_path: Path, demo_dir: Path
    ) -> None:
        """chat_template gives a file without one a template: the member can chat, renders
        with it, and routing sends it chats."""
        template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
        settings = _mixed(tmp_path, demo_dir)
        data = settings.model_dump(mode="python")
        data["models"][0]["chat_template"] = template
        ensemble = make_ensemble(Settings.model_validate(data))
        await ensemble.load_all()
        loaded = ensemble.slots["base"].active
        assert loaded is not None
        assert loaded.engine.info.can_chat
        engine = loaded.engine
        assert isinstance(engine, EngineWrapper)
        rendered = engine.real.detokenize(engine.render_chat(list(CHAT)).tokens)
        assert rendered.endswith("<user>Hello<assistant>")
        assert (await ensemble.complete(request(prompt=None, messages=CHAT))).member == "base"


class TestContextSize:
    async def test_a_prompt_too_long_for_one_member_goes_to_one_with_room(
        self,
        make_ensemble: EnsembleFactory,
        demo_dir: Path,
        events: Events,
        provider: TracerProvider,
        exporter: InMemorySpanExporter,
    ) -> None:
        """The preferred member's context is too small for the prompt: the next member,
        with a larger one, answers, and the skip is no failure of anyone (its span says
        why it was passed over)."""
        path = str(demo_dir / "demo-tiny.gguf")
        settings = Settings.from_mapping(
            {
                "models": [
                    {"name": "small", "path": path, "n_ctx": 64},
                    {"name": "large", "path": path, "n_ctx": 512},
                ],
                "modes": {"fast": {"prefer": ["small"]}},
            },
            environ={},
        )
        ensemble = make_ensemble(settings, tracer=provider.get_tracer("test"))
        await ensemble.load_all()
        long_prompt = "word " * 100
        result = await ensemble.complete(request(prompt=long_prompt))
        assert result.member == "large"
        assert (await ensemble.complete(request(prompt="Hi"))).member == "small"
        assert events.of(InferenceFailed) == []
        assert [e.model for e in events.of(InferenceFinished)] == ["large", "small"]
        skipped = [
            (span.attributes or {}).get("gen_ai.response.model")
            for span in exporter.get_finished_spans()
            if (span.attributes or {}).get("ensemble_ops.skipped")
            == "the prompt does not fit its context"
        ]
        assert skipped == ["small"]

    async def test_a_prompt_too_long_for_every_member_is_the_clients_error(
        self, ensemble: Ensemble, events: Events
    ) -> None:
        """When no member has room, the answer is context_length_exceeded (a 400), naming the
        largest context, once."""
        over = GenerationParams(max_tokens=250, temperature=0.0, top_p=1.0)
        with pytest.raises(ContextLengthExceededError, match="maximum context length is 256"):
            await ensemble.complete(request(params=over, prompt="Hello " * 10))
        finals = [(f.model, f.error_type) for f in events.of(InferenceFailed) if f.final]
        assert finals == [("ensemble", "context_length_exceeded")]

    async def test_the_refusal_names_the_largest_context_whichever_is_tried_last(
        self, make_ensemble: EnsembleFactory, demo_dir: Path
    ) -> None:
        """The larger member is tried first and the smaller last: the client is still told
        the larger context, the one a shorter prompt must fit."""
        path = str(demo_dir / "demo-tiny.gguf")
        settings = Settings.from_mapping(
            {
                "models": [
                    {"name": "large", "path": path, "n_ctx": 128},
                    {"name": "small", "path": path, "n_ctx": 64},
                ],
                "modes": {"fast": {"prefer": ["large", "small"]}},
            },
            environ={},
        )
        ensemble = make_ensemble(settings)
        await ensemble.load_all()
        with pytest.raises(ContextLengthExceededError, match="maximum context length is 128"):
            await ensemble.complete(request(prompt="word " * 200))

    async def test_when_the_member_with_room_is_busy_the_client_is_told_to_retry(
        self, make_ensemble: EnsembleFactory, demo_dir: Path
    ) -> None:
        """One member too small, the one with room full: a 503 naming both reasons, not a
        400 that would have the client shorten a prompt that fits."""
        path = str(demo_dir / "demo-tiny.gguf")
        settings = Settings.from_mapping(
            {
                "models": [
                    {"name": "small", "path": path, "n_ctx": 64},
                    {"name": "large", "path": path, "n_ctx": 512, "queue_size": 0, "parallel": 1},
                ],
                "modes": {"fast": {"prefer": ["small"]}},
            },
            environ={},
        )
        ensemble = make_ensemble(settings)
        await ensemble.load_all()
        held = ensemble.slots["large"].acquire()
        try:
            with pytest.raises(NoMemberAvailableError) as refused:
                await ensemble.complete(request(prompt="word " * 100))
        finally:
            held.release()
        assert refused.value.reasons == {
            "small": "the prompt does not fit its context",
            "large": "overloaded",
        }

    async def test_a_prompt_too_long_for_a_named_member_is_its_final_failure(
        self, ensemble: Ensemble, events: Events
    ) -> None:
        """Named, the member is the only candidate: its refusal is the answer, reported
        once, as final, under the member's name."""
        over = GenerationParams(max_tokens=250, temperature=0.0, top_p=1.0)
        with pytest.raises(ContextLengthExceededError, match="maximum context length is 256"):
            await ensemble.complete(request("a", params=over, prompt="Hello " * 10))
        failed = [(f.model, f.error_type, f.final) for f in events.of(InferenceFailed)]
        assert failed == [("a", "context_length_exceeded", True)]


class TestSplitOrder:
    @pytest.mark.parametrize(
        ("point", "first"),
        [(0.0, "a"), (49.999, "a"), (50.0, "b"), (99.999, "b"), (100.0, "b")],
    )
    def test_the_slices_meet_exactly_at_the_weights(self, point: float, first: str) -> None:
        """[0, 50) is a's and [50, 100) b's; a point past the last edge (rounding) is the
        last member's."""
        assert split_order({"a": 1.0, "b": 1.0}, point)[0] == first

    def test_a_point_that_rounding_puts_past_the_last_edge_is_the_last_members(self) -> None:
        """Three equal thirds add up to 99.99999999999999, the largest point below 100: a
        point there is in the last slice, not in any other."""
        weights = {"a": 1.0, "b": 1.0, "c": 1.0}
        assert split_order(weights, math.nextafter(100.0, 0.0)) == ["c", "a", "b"]

    def test_the_others_follow_heaviest_first_config_order_among_equals(self) -> None:
        weights = {"a": 20.0, "b": 50.0, "c": 30.0, "d": 30.0}  # slices end at 15.4, 53.8, 76.9
        assert split_order(weights, 10.0) == ["a", "b", "c", "d"]
        assert split_order(weights, 25.0) == ["b", "c", "d", "a"]
        assert split_order(weights, 70.0) == ["c", "b", "d", "a"]
