"""ModelSlot and Loaded: leases, the queue bound, the atomic swap, draining."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from ensemble_ops.config import ModelSpec
from ensemble_ops.errors import ModelUnavailableError, OverloadedError
from ensemble_ops.serving.engine import LlamaEngine
from ensemble_ops.serving.slot import Loaded, ModelSlot


@pytest.fixture(name="spec")
def _spec(demo_dir: Path) -> ModelSpec:
    return ModelSpec(name="demo-tiny", path=demo_dir / "demo-tiny.gguf", n_ctx=256, queue_size=1)


def _loaded(spec: ModelSpec) -> Loaded:
    return Loaded(spec.name, LlamaEngine.load(spec))


class TestModelSlot:
    async def test_no_instance_is_unavailable(self, spec: ModelSpec) -> None:
        """Before loading, a lease fails with the reason."""
        slot = ModelSlot(spec)
        with pytest.raises(ModelUnavailableError, match="still loading"):
            slot.acquire()
        slot.mark_failed("boom")
        with pytest.raises(ModelUnavailableError, match=r"failed to load \(boom\)"):
            slot.acquire()

    async def test_leases_count_and_bound(self, spec: ModelSpec) -> None:
        """One running plus queue_size waiting; the next is refused; release frees a place."""
        slot = ModelSlot(spec)
        loaded = _loaded(spec)
        slot.swap(loaded)
        first, second = slot.acquire(), slot.acquire()
        assert loaded.in_flight == 2
        with pytest.raises(OverloadedError):
            slot.acquire()
        first.release()
        first.release()  # idempotent
        assert loaded.in_flight == 1
        slot.acquire().release()
        second.release()
        assert loaded.in_flight == 0
        await loaded.close()

    async def test_swap_is_atomic_and_old_drains(self, spec: ModelSpec) -> None:
        """After swap, new leases get the new instance; the old one drains its own."""
        slot = ModelSlot(spec)
        old, new = _loaded(spec), _loaded(spec)
        slot.swap(old)
        held = slot.acquire()
        assert slot.swap(new) is old
        assert slot.acquire().loaded is new
        assert held.loaded is old
        assert not await old.wait_idle(0.05)  # still held: the drain times out
        async with anyio.create_task_group() as tasks:

            async def release_later() -> None:
                await anyio.sleep(0.05)
                held.release()

            tasks.start_soon(release_later)
            assert await old.wait_idle(5.0)
        assert old.generation != new.generation
        await old.close()
        await new.close()
