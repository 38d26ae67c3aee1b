"""A/B splits: a model name of its own shares requests among members by weight, sticky per
session key (the ``user`` field or ``X-Session-ID``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from ensemble_ops.config import Settings
from ensemble_ops.errors import ModelNotFoundError
from ensemble_ops.events import EventBus
from ensemble_ops.http.app import create_app
from ensemble_ops.serving.ensemble import Ensemble
from ensemble_ops.serving.llama_engine import LlamaEngine
from ensemble_ops.tasks import TaskRunner

from ..conftest import SettingsFactory, route, serving

SPLIT = "ab"
AB = {"a": 70.0, "b": 30.0}
CHEAP = {"model": SPLIT, "prompt": "Hi", "max_tokens": 1, "temperature": 0.8}
"""One sampled token: cheap, and never a cache hit."""


@pytest.fixture(name="make_split")
def _make_split(make_settings: SettingsFactory, demo_dir: Path) -> Callable[..., Settings]:
    """Settings whose members (all the tiny demo model under other names, unless a path is
    given) are split by ``weights``; the response cache is off."""

    def make(
        weights: Mapping[str, float] = AB, paths: Mapping[str, Path] | None = None
    ) -> Settings:
        models: list[dict[str, Any]] = [
            {
                "name": name,
                "path": str((paths or {}).get(name, demo_dir / "demo-tiny.gguf")),
                "n_ctx": 256,
            }
            for name in weights
        ]
        return make_settings(
            models=models,
            splits={SPLIT: {"weights": dict(weights)}},
            cache={"enabled": False},
        )

    return make


@pytest.fixture(name="make_ensemble")
async def _make_ensemble() -> AsyncIterator[Callable[..., Ensemble]]:
    """Ensembles that route without loading anything (routing needs no engine)."""
    runner = TaskRunner()

    def make(settings: Settings, **options: Any) -> Ensemble:
        return Ensemble(settings, EventBus(), LlamaEngine.load, runner, **options)

    try:
        yield make
    finally:
        await runner.aclose()


def _chosen(ensemble: Ensemble, session: str | None) -> str:
    return route(ensemble, SPLIT, "balanced", session)[0]


def _keys_for(ensemble: Ensemble, member: str, count: int = 1) -> list[str]:
    """Session keys the split sends to ``member``."""
    keys = (f"conversation-{i}" for i in range(10_000))
    return [key for key in keys if _chosen(ensemble, key) == member][:count]


def _shares(chosen: list[str]) -> dict[str, float]:
    counts = Counter(chosen)
    return {name: 100 * n / len(chosen) for name, n in counts.items()}


class TestChoice:
    @pytest.mark.parametrize(
        "weights",
        [AB, {"a": 50.0, "b": 30.0, "c": 20.0}, {"a": 1.0, "b": 1.0}],
    )
    async def test_shares_over_1000_sessions_follow_the_weights(
        self,
        make_split: Callable[..., Settings],
        make_ensemble: Callable[..., Ensemble],
        weights: dict[str, float],
    ) -> None:
        """Over 1,000 session keys each member's share is within 5 points of its weight."""
        ensemble = make_ensemble(make_split(weights))
        shares = _shares([_chosen(ensemble, f"user-{i}") for i in range(1000)])
        total = sum(weights.values())
        for name, weight in weights.items():
            assert abs(shares.get(name, 0.0) - 100 * weight / total) <= 5, shares

    async def test_without_a_key_the_shares_still_follow_the_weights(
        self, make_split: Callable[..., Settings], make_ensemble: Callable[..., Ensemble]
    ) -> None:
        """Requests without a key are spread at random, in proportion to the weights."""
        ensemble = make_ensemble(make_split())
        shares = _shares([_chosen(ensemble, None) for _ in range(4000)])
        assert abs(shares["a"] - 70) <= 5, shares  # 4,000 draws: 5 points is ~7 sigma

    async def test_a_key_always_gets_the_same_member(
        self, make_split: Callable[..., Settings], make_ensemble: Callable[..., Ensemble]
    ) -> None:
        """The same key gets the same order every time, and from a second ensemble too (as
        another replica would)."""
        settings = make_split({"a": 50.0, "b": 30.0, "c": 20.0})
        one, other = make_ensemble(settings), make_ensemble(settings)
        for key in (f"k{i}" for i in range(50)):
            orders = {tuple(route(ensemble, SPLIT, "fast", key)) for ensemble in (one, one, other)}
            assert len(orders) == 1

    async def test_the_others_follow_the_chosen_one_heaviest_first(
        self, make_split: Callable[..., Settings], make_ensemble: Callable[..., Ensemble]
    ) -> None:
        """After the chosen member come the split's others, by weight, as fallbacks."""
        ensemble = make_ensemble(make_split({"a": 20.0, "b": 50.0, "c": 30.0}))
        orders = {
            member: route(ensemble, SPLIT, "fast", key)
            for member in ("a", "b", "c")
            for key in _keys_for(ensemble, member)
        }
        assert orders == {"a": ["a", "b", "c"], "b": ["b", "c", "a"], "c": ["c", "b", "a"]}

    async def test_unfit_members_go_last(
        self, make_split: Callable[..., Settings], make_ensemble: Callable[..., Ensemble]
    ) -> None:
        """A member the health view finds unfit is tried after the others, even when the
        session's key chose it."""
        settings = make_split()
        (key,) = _keys_for(make_ensemble(settings), "a")
        ensemble = make_ensemble(settings, can_serve=lambda name: name != "a")
        assert route(ensemble, SPLIT, "fast", key) == ["b", "a"]

    async def test_an_unknown_name_lists_the_splits(
        self, make_split: Callable[..., Settings], make_ensemble: Callable[..., Ensemble]
    ) -> None:
        """A name that is neither a member nor a split is refused, naming both."""
        ensemble = make_ensemble(make_split())
        with pytest.raises(ModelNotFoundError, match=r"choose one of: ensemble, a, b, ab\.$"):
            route(ensemble, "abc", "fast")


class TestServing:
    async def test_the_answering_member_follows_the_sticky_choice(
        self, make_split: Callable[..., Settings]
    ) -> None:
        """Over 200 sessions, each answer names the member the split chose for its key."""
        app = create_app(make_split())
        async with serving(app) as client:
            ensemble: Ensemble = app.state.ensemble
            answered = []
            for i in range(200):
                key = f"session-{i}"
                response = await client.post("/v1/completions", json={**CHEAP, "user": key})
                assert response.status_code == 200
                assert response.headers["x-ensemble-member"] == response.json()["model"]
                assert response.json()["model"] == _chosen(ensemble, key)
                answered.append(response.json()["model"])
        assert set(answered) == {"a", "b"}

    async def test_a_session_stays_on_one_member(self, make_split: Callable[..., Settings]) -> None:
        """Repeated requests of one session, by user or by X-Session-ID, chat or not, stream
        or not, all go to the member its key chose."""
        app = create_app(make_split())
        async with serving(app) as client:
            ensemble: Ensemble = app.state.ensemble
            for member in ("a", "b"):
                (key,) = _keys_for(ensemble, member)
                chat = {
                    "model": SPLIT,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 1,
                    "user": key,
                }
                answers = [
                    await client.post("/v1/completions", json={**CHEAP, "user": key}),
                    await client.post("/v1/chat/completions", json=chat),
                    await client.post("/v1/completions", json=CHEAP, headers={"X-Session-ID": key}),
                    await client.post(
                        "/v1/completions", json={**CHEAP, "stream": True, "user": key}
                    ),
                    *[
                        await client.post(
                            "/v1/completions", json=CHEAP, headers={"x-session-id": key}
                        )
                        for _ in range(5)
                    ],
                ]
                assert [r.headers["x-ensemble-member"] for r in answers] == [member] * 9

    async def test_the_header_wins_over_user(self, make_split: Callable[..., Settings]) -> None:
        """With both, X-Session-ID decides; an empty header leaves it to user."""
        app = create_app(make_split())
        async with serving(app) as client:
            ensemble: Ensemble = app.state.ensemble
            (to_a,), (to_b,) = _keys_for(ensemble, "a"), _keys_for(ensemble, "b")
            for user, header, member in ((to_a, to_b, "b"), (to_b, to_a, "a"), (to_b, "", "b")):
                response = await client.post(
                    "/v1/completions",
                    json={**CHEAP, "user": user},
                    headers={"X-Session-ID": header},
                )
                assert response.json()["model"] == member

    async def test_without_a_key_both_members_answer(
        self, make_split: Callable[..., Settings]
    ) -> None:
        """Requests without a key are spread by weight: the heavier member answers more."""
        async with serving(create_app(make_split())) as client:
            answered = Counter(
                [
                    (await client.post("/v1/completions", json=CHEAP)).json()["model"]
                    for _ in range(100)
                ]
            )
        assert answered["a"] > answered["b"] > 0

    async def test_a_split_falls_back_when_its_choice_failed_to_load(
        self,
        make_split: Callable[..., Settings],
        make_ensemble: Callable[..., Ensemble],
        tmp_path: Path,
    ) -> None:
        """A session whose member cannot serve (its file is broken) is answered by the other."""
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"GGUF" + b"\0" * 64)
        settings = make_split(paths={"a": bad})
        (key,) = _keys_for(make_ensemble(settings), "a")  # as if every member were fit
        async with serving(create_app(settings)) as client:
            for stream in (False, True):
                response = await client.post(
                    "/v1/completions", json={**CHEAP, "user": key, "stream": stream}
                )
                assert response.status_code == 200
                assert response.headers["x-ensemble-member"] == "b"
            named = await client.post("/v1/completions", json={**CHEAP, "model": "a"})
            assert named.status_code == 503  # asked for by name: no fallback

    async def test_a_split_falls_back_when_its_choice_is_full(
        self, make_settings: SettingsFactory, demo_dir: Path
    ) -> None:
        """A session whose member has no room (its queue is full) is answered by the other;
        once there is room again the session is back on its own member."""
        models = [
            {"name": n, "path": str(demo_dir / "demo-tiny.gguf"), "parallel": 1, "queue_size": 0}
            for n in AB
        ]
        settings = make_settings(models=models, splits={SPLIT: {"weights": AB}})
        app = create_app(settings)
        async with serving(app) as client:
            ensemble: Ensemble = app.state.ensemble
            (key,) = _keys_for(ensemble, "a")
            held = ensemble.slots["a"].acquire()
            try:
                busy = await client.post("/v1/completions", json={**CHEAP, "user": key})
            finally:
                held.release()
            again = await client.post("/v1/completions", json={**CHEAP, "user": key})
        assert (busy.json()["model"], again.json()["model"]) == ("b", "a")

    async def test_models_list_shows_the_split(self, make_split: Callable[..., Settings]) -> None:
        """/v1/models lists the split after the ensemble entry, marked as a split with its
        weights; an unknown model's 404 names it among the choices."""
        async with serving(create_app(make_split())) as client:
            body = (await client.get("/v1/models")).json()
            unknown = await client.post("/v1/completions", json={**CHEAP, "model": "abc"})
        assert [m["id"] for m in body["data"]] == ["ensemble", SPLIT, "a", "b"]
        assert body["data"][1]["meta"]["kind"] == "split"
        assert body["data"][1]["meta"]["weights"] == AB
        assert unknown.status_code == 404
        assert "ensemble, a, b, ab." in unknown.json()["error"]["message"]
