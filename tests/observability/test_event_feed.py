"""The event feed: numbered records, filters, resuming, and slow followers dropped."""

from __future__ import annotations

import pytest

from ensemble_ops.events import (
    EventBus,
    HealthChanged,
    InferenceFailed,
    InferenceFinished,
    ModelLoadFailed,
    ReloadStateChanged,
)
from ensemble_ops.observability.event_feed import RING_SIZE, EventFeed, file_names_only


def _state(model: str, to: str) -> ReloadStateChanged:
    return ReloadStateChanged(model, "idle", to, 0.0, f"Checking /models/{model}.gguf", 0.1)


@pytest.fixture(name="bus")
def _bus() -> EventBus:
    return EventBus()


class TestRecords:
    def test_each_event_is_a_numbered_record_named_as_in_the_log(self, bus: EventBus) -> None:
        feed = EventFeed(bus, clock=lambda: 1000.0)
        bus.publish(_state("a", "warming_up"))
        bus.publish(HealthChanged("a", "healthy", "unhealthy", "3 inferences failed in a row"))
        [state, health] = feed.recent("reload.state_changed", 5) + feed.recent("health.changed", 5)
        assert state.as_dict() == {
            "id": 1,
            "type": "reload.state_changed",
            "model": "a",
            "ts": 1000.0,
            "from": "idle",
            "to": "warming_up",
            "progress": 0.0,
            "message": "Checking a.gguf",
            "elapsed_s": 0.1,
        }
        assert (health.id, health.data["new"]) == (2, "unhealthy")
        assert feed.last_id == 2

    def test_a_request_is_one_summary_without_content(self, bus: EventBus) -> None:
        feed = EventFeed(bus)
        bus.publish(InferenceFailed("a", "fast", "engine_error", "boom", 0.5, final=False))
        bus.publish(InferenceFinished("b", "fast", 0.25, 7, 3, cached=True, stream=False))
        bus.publish(InferenceFailed("b", "fast", "overloaded", "queue full", 0.01))
        requests = feed.recent("request", 10)
        assert [(r.model, r.data["status"]) for r in requests] == [
            ("b", "success"),
            ("b", "overloaded"),
        ]
        assert set(requests[0].data) == {
            "mode",
            "copy",
            "status",
            "latency_ms",
            "prompt_tokens",
            "completion_tokens",
            "cached",
            "stream",
            "key",
        }
        assert requests[0].data["latency_ms"] == 250.0

    def test_paths_are_cut_to_file_names(self, bus: EventBus) -> None:
        feed = EventFeed(bus)
        bus.publish(ModelLoadFailed("a", "cannot load /srv/models/secret/a.gguf: bad magic"))
        [failed] = feed.recent("model.load_failed", 1)
        assert failed.data["error"] == "cannot load a.gguf: bad magic"
        assert file_names_only("C:\\models\\x.gguf and /a/b.gguf") == "x.gguf and b.gguf"
        assert file_names_only("no path here 1/2") == "no path here 1/2"


class TestFollowers:
    async def test_filters_by_model_and_type(self, bus: EventBus) -> None:
        feed = EventFeed(bus)
        follower = feed.follow(models=["a"], types=["reload.state_changed"])
        bus.publish(_state("a", "warming_up"))
        bus.publish(_state("b", "warming_up"))
        bus.publish(HealthChanged("a", "healthy", "degraded", "slow"))
        batch = await follower.next_batch(0.01)
        assert [(e.model, e.type) for e in batch] == [("a", "reload.state_changed")]

    async def test_a_follower_resumes_after_its_last_event(self, bus: EventBus) -> None:
        feed = EventFeed(bus)
        for to in ("warming_up", "ready", "switching", "completed"):
            bus.publish(_state("a", to))
        follower = feed.follow(after=2)
        assert [e.data["to"] for e in await follower.next_batch(0.01)] == [
            "switching",
            "completed",
        ]

    async def test_only_the_last_thousand_are_kept(self, bus: EventBus) -> None:
        feed = EventFeed(bus)
        for _ in range(RING_SIZE + 5):
            bus.publish(_state("a", "ready"))
        follower = feed.follow(after=0)
        batch = await follower.next_batch(0.01)
        assert (len(batch), batch[0].id) == (RING_SIZE, 6)

    async def test_a_follower_a_thousand_behind_is_dropped_and_the_bus_goes_on(
        self, bus: EventBus
    ) -> None:
        dropped: list[int] = []
        feed = EventFeed(bus, on_drop=lambda: dropped.append(1))
        slow, reading = feed.follow(), feed.follow(types=["health.changed"])
        for _ in range(RING_SIZE):
            bus.publish(_state("a", "ready"))
        assert (slow.ended, dropped) == (None, [])
        bus.publish(_state("a", "ready"))  # the 1,001st unread one
        assert (slow.ended, dropped, feed.followers) == ("dropped", [1], 1)
        bus.publish(HealthChanged("a", "healthy", "degraded", "slow"))
        assert [e.type for e in await reading.next_batch(0.01)] == ["health.changed"]
        assert len(await slow.next_batch(0.01)) == RING_SIZE  # what it had, then the end

    async def test_close_ends_every_follower_at_once(self, bus: EventBus) -> None:
        feed = EventFeed(bus)
        follower = feed.follow()
        feed.close()
        assert await follower.next_batch(60) == []  # returns at once: the stream ends
        assert follower.ended == "closing"
        late = feed.follow()
        assert late.ended == "closing"
