"""The ensemble's members and their lifecycle: loading, failing to load, closing."""

from __future__ import annotations

import anyio
import pytest

from ensemble_ops.errors import ModelUnavailableError
from ensemble_ops.events import ModelLoaded, ModelLoadFailed, ModelUnloaded
from ensemble_ops.serving.ensemble import Ensemble

from .conftest import Engines, EnsembleFactory, Events, request


class TestLifecycle:
    async def test_a_member_that_fails_to_load_is_marked_and_the_others_load(
        self, make_ensemble: EnsembleFactory, engines: Engines, events: Events
    ) -> None:
        """A load failure marks that member failed with the error; loading goes on."""
        engines.broken.add("b")
        ensemble = make_ensemble()
        await ensemble.load_all()
        assert ensemble.loading_done.is_set()
        assert {n: s.state for n, s in ensemble.slots.items()} == {
            "a": "ready",
            "b": "failed",
            "c": "ready",
        }
        assert [(e.model, e.error) for e in events.of(ModelLoadFailed)] == [
            ("b", "Inference failed on model 'b': cannot load")
        ]
        assert [e.model for e in events.of(ModelLoaded)] == ["a", "c"]
        assert [i.name for i in ensemble.instances()] == ["a", "c"]
        assert (await ensemble.complete(request())).member == "c"

    async def test_closing_frees_every_copy_and_refuses_requests(
        self, ensemble: Ensemble, engines: Engines, events: Events
    ) -> None:
        """close() unloads and closes every member's copy and announces each."""
        generations = {n: s.active.generation for n, s in ensemble.slots.items() if s.active}
        await ensemble.close(drain_timeout_s=1.0)
        assert all(engine.closed for engine in engines.by_name.values())
        assert {e.model: e.generation for e in events.of(ModelUnloaded)} == generations
        assert {s.state for s in ensemble.slots.values()} == {"stopped"}
        assert ensemble.instances() == []
        with pytest.raises(ModelUnavailableError, match="not loaded"):
            await ensemble.complete(request("a"))

    async def test_closing_waits_for_a_request_in_flight(
        self, ensemble: Ensemble, engines: Engines
    ) -> None:
        """A request still running when shutdown starts finishes before its copy closes."""
        held = ensemble.slots["a"].acquire()
        closing: list[bool] = []

        async def release_later() -> None:
            await anyio.sleep(0.1)
            closing.append(engines.by_name["a"].closed)
            held.release()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(release_later)
            await ensemble.close(drain_timeout_s=5.0)
        assert closing == [False]
        assert engines.by_name["a"].closed

    async def test_a_member_loaded_after_shutdown_began_is_closed(
        self, make_ensemble: EnsembleFactory, engines: Engines
    ) -> None:
        """A load that ends after close() started frees its engine instead of serving."""
        ensemble = make_ensemble()
        await ensemble.close(drain_timeout_s=1.0)
        await ensemble.load(ensemble.slots["a"])
        assert engines.by_name["a"].closed
        assert ensemble.slots["a"].active is None
